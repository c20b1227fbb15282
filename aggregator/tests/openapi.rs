//! `GET /api/v1/openapi.json` describes what the API answers: every documented GET path is called
//! on an aggregator holding windows, quarantine, anomalies and alerts, and each answer is checked
//! against its documented schema: types, required members, and no member the document leaves out.

mod common;

use std::collections::BTreeSet;

use common::{Aggregator, T0, postcard_batch};
use serde_json::Value;

const PIPELINE: &str = "[[anomaly]]\nsensor = \"pump/*\"\nwarmup = 10\n\
    [[alerts]]\nname = \"hot\"\nsensor = \"line*/temp\"\nabove = 80.0\n\
    [[alerts]]\nname = \"silent\"\nsensor = \"line*/temp\"\nstale = \"1h\"\n";

/// Resolves `{"$ref": "#/components/schemas/X"}`.
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(spec, &spec["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Every member an object schema names, across `allOf` parts (serde's flatten).
fn properties(spec: &Value, schema: &Value, out: &mut BTreeSet<String>) {
    let schema = resolve(spec, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        out.extend(props.keys().cloned());
    }
    for part in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        properties(spec, part, out);
    }
}

fn check(spec: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    check_in(spec, schema, value, at, None)
}

/// `allowed`: the members the enclosing `allOf` documents (each part names only its own).
fn check_in(
    spec: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    allowed: Option<&BTreeSet<String>>,
) -> Result<(), String> {
    let schema = resolve(spec, schema);
    let mut named = BTreeSet::new();
    properties(spec, schema, &mut named);
    let allowed = allowed.unwrap_or(&named);
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        for part in parts {
            check_in(spec, part, value, at, Some(allowed))?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(parts) = schema.get(key).and_then(Value::as_array) {
            let errors: Vec<String> = parts.iter().filter_map(|p| check(spec, p, value, at).err()).collect();
            if errors.len() == parts.len() {
                return Err(format!("{at}: matches none of {key}: {errors:?}"));
            }
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let fits = |t: &str| match t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        };
        if !types.iter().any(|t| fits(t)) {
            return Err(format!("{at}: {value} is not {types:?}"));
        }
    }
    if let Some(object) =
        value.as_object().filter(|_| schema.get("properties").is_some() || schema.get("allOf").is_some())
    {
        for key in object.keys() {
            if !allowed.contains(key) {
                return Err(format!("{at}: member {key:?} is not documented (documented: {allowed:?})"));
            }
        }
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let key = required.as_str().unwrap_or_default();
            if !object.contains_key(key) {
                return Err(format!("{at}: required member {key:?} is missing"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (key, sub) in props {
                if let Some(v) = object.get(key) {
                    check(spec, sub, v, &format!("{at}.{key}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            check(spec, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[test]
fn every_documented_route_answers_in_its_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), PIPELINE);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut readings: Vec<(&str, i64, f64)> = (0..300)
        .map(|i| {
            let spike = if i == 250 { 40.0 } else { 0.0 };
            (["line1/temp", "pump/1", "line2/temp"][i % 3], T0 + i as i64 * 1_000, 70.0 + (i % 20) as f64 + spike)
        })
        .collect();
    readings.push(("line1/temp", now + 3_600_000, 1.0)); // quarantined: an hour ahead
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    // A second epoch that starts at 5: a gap of 5 readings for /api/v1/gaps.
    agg.ingest_ok(0, &postcard_batch("gw-1", 2, &[(5, &[("pump/1", T0 + 400_000, 1.0)][..])]));
    // What the agent says about them (POST /api/v1/gaps), listed with the gap.
    let report = serde_json::json!({"agent_id": "gw-1", "epoch": 2, "gaps": [{"from_seq": 0, "to_seq": 5,
        "readings": 5, "first_ts": T0, "last_ts": null, "sensors": ["pump/1"], "sensor_count": 1,
        "reason": "max_age", "recorded_at": T0}]});
    let headers = [("Authorization", "Bearer secret-gw-1".to_string()), ("Content-Type", "application/json".into())];
    let posted = common::http(agg.addr, "POST", "/api/v1/gaps", &headers, report.to_string().as_bytes());
    assert_eq!(posted.status, 204, "{}", posted.text());
    agg.wait_processed();

    let response = agg.get("/api/v1/openapi.json");
    assert_eq!(response.status, 200);
    let spec: Value = serde_json::from_slice(&response.body).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{}", spec["openapi"]);
    let (from, to) = (T0, T0 + 3_600_000);
    // A request for each documented GET path that needs parameters; the others are called bare.
    let example = |path: &str| -> Option<String> {
        Some(match path {
            "/api/v1/sensors/{id}" => "/api/v1/sensors/line1/temp".into(),
            "/api/v1/sensors/{id}/windows" => {
                format!("/api/v1/sensors/line1%2Ftemp/windows?size=1m&from={from}&to={to}")
            }
            "/api/v1/sensors/{id}/series" => {
                format!("/api/v1/sensors/line1%2Ftemp/series?from={from}&to={to}&step=1m&agg=mean,min,max,count")
            }
            "/api/v1/windows" => format!("/api/v1/windows?sensor=**&size=1m&from={from}&to={to}"),
            "/api/v1/latest" => "/api/v1/latest?sensor=line*/*".into(),
            "/api/v1/anomalies" => "/api/v1/anomalies?sensor=**".into(),
            // An endless event stream: its schema is a content type, checked by tests/stream.rs.
            "/api/v1/stream" => return None,
            other => other.to_string(),
        })
    };
    let mut checked = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        let Some(get) = item.get("get") else { continue };
        let Some(url) = example(path) else { continue };
        let response = agg.get(&url);
        assert_eq!(response.status, 200, "{url}: {}", response.text());
        let body: Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| panic!("{url}: {e}"));
        if let Some(schema) = get["responses"]["200"]["content"]["application/json"].get("schema") {
            check(&spec, schema, &body, path).unwrap_or_else(|e| panic!("{url}: {e}\n{body}"));
            // Not vacuous: the lists hold something to check.
            if let Some(list) = body.as_array() {
                assert!(!list.is_empty() || path == "/api/v1/set-aside", "{url} answered an empty list");
            }
        }
        checked.push(path.clone());
    }
    for path in
        ["/api/v1/sensors", "/api/v1/sensors/{id}/windows", "/api/v1/alerts", "/api/v1/pipeline", "/api/v1/agents"]
    {
        assert!(checked.iter().any(|p| p == path), "{path} is not documented: {checked:?}");
    }
    assert!(spec["paths"]["/api/v1/ingest"]["post"].is_object());
    assert!(spec["paths"]["/api/v1/gaps"]["post"].is_object());
    let (_, gaps) = agg.get_json("/api/v1/gaps");
    assert_eq!(gaps[0]["reports"][0]["reason"], "max_age", "{gaps}");
    // An error answers in the documented error shape.
    let bad = agg.get("/api/v1/sensors/line1%2Ftemp/windows?size=7s");
    assert_eq!(bad.status, 400);
    let schema = &spec["paths"]["/api/v1/sensors/{id}/windows"]["get"]["responses"]["400"]["content"]["application/json"]
        ["schema"];
    check(&spec, schema, &serde_json::from_slice(&bad.body).unwrap(), "error").unwrap();
}
