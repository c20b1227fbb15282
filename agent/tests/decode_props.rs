//! Property tests of the MQTT payload decoder: whatever a client publishes, the decoder returns
//! readings that pass validation or counted rejections, never a panic; and every payload the
//! README documents decodes to exactly the readings it spells, bit for bit.
//!
//! Long run: `PROPTEST_CASES=100000 cargo test --release -p tributary-agent --test decode_props`.

use proptest::prelude::*;
use tributary_agent::decode::{Decoder, Reject};
use tributary_shared::reading::validate_ts_at;
use tributary_shared::{MAX_SENSOR_ID_LEN, MIN_TS_MS, Reading};

const NOW: i64 = 1_764_000_000_000;
const SKEW: i64 = 300_000;
const MAX_PAYLOAD: usize = 64 * 1024;

fn decoder() -> Decoder {
    Decoder::new(&["sensors/#".to_string(), "site/+/meters/#".to_string()], MAX_PAYLOAD, SKEW)
}

/// (readings, rejects) of one message.
fn decode(topic: &[u8], payload: &[u8]) -> (Vec<Reading>, Vec<Reject>) {
    let mut out = Vec::new();
    let mut rejects = Vec::new();
    let n = decoder().decode(
        topic,
        payload,
        NOW,
        |sensor, ts, value| out.push(Reading { sensor: sensor.to_string(), ts, value }),
        |r| rejects.push(r),
    );
    assert_eq!(n, out.len(), "decode returns how many readings it emitted");
    (out, rejects)
}

/// Readings compared with their values as bits (-0.0 is not 0.0 here).
fn bits(readings: &[Reading]) -> Vec<(String, i64, u64)> {
    readings.iter().map(|r| (r.sensor.clone(), r.ts, r.value.to_bits())).collect()
}

/// Text made of a valid id's characters: letters, `/`, `-`, and any other char that is neither a
/// wildcard nor a control character.
fn id_text(max_bytes: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        6 => proptest::char::range('a', 'z'),
        1 => Just('/'),
        1 => Just('-'),
        1 => any::<char>().prop_map(|c| if matches!(c, '+' | '#') || c.is_control() { '_' } else { c }),
    ];
    proptest::collection::vec(ch, 1..=max_bytes).prop_map(move |chars| {
        let mut id = String::new();
        for c in chars {
            if id.len() + c.len_utf8() > max_bytes {
                break;
            }
            id.push(c);
        }
        id
    })
}

fn finite_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => any::<f64>().prop_filter("finite", |v| v.is_finite()),
        1 => prop_oneof![
            Just(f64::MAX),
            Just(f64::MIN),
            Just(f64::MIN_POSITIVE),
            Just(f64::from_bits(1)),
            Just(-f64::from_bits(1)),
            Just(0.0),
            Just(-0.0),
            Just(1e308),
            Just(-1e308),
        ],
        1 => (0u64..(1 << 52)).prop_map(f64::from_bits),
        2 => -1e6f64..1e6,
        1 => (-1_000_000i64..1_000_000).prop_map(|n| n as f64),
    ]
}

/// A timestamp the agent accepts at NOW: from 2000 up to NOW + the allowed skew.
fn accepted_ts() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => MIN_TS_MS..=NOW + SKEW,
        1 => prop_oneof![Just(MIN_TS_MS), Just(NOW + SKEW), Just(NOW)],
    ]
}

/// A number as a device may spell it: shortest round-trip form, exponent forms, JSON's form.
fn spelled(value: f64, style: u8) -> String {
    match style % 4 {
        0 => format!("{value}"),
        1 => format!("{value:e}"),
        2 => format!("{value:E}"),
        _ => serde_json::to_string(&value).expect("finite values serialise"),
    }
}

/// Text that looks like a payload in places: the decoder's error paths.
fn payload_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just(" ".to_string()),
        Just("\"value\"".to_string()),
        Just("\"ts\"".to_string()),
        Just("\"t\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("-infinity".to_string()),
        Just("1e999".to_string()),
        Just("-0".to_string()),
        Just("1764000000000".to_string()),
        Just("946684799999".to_string()),
        Just("253402300799999".to_string()),
        Just("18446744073709551616".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|v| format!("{v:e}")),
        "\"[^\"\\\\]{0,8}\"",
    ];
    proptest::collection::vec(token, 0..30).prop_map(|t| t.concat())
}

fn topic() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => proptest::collection::vec(any::<u8>(), 0..160).prop_map(|rest| [b"sensors/".as_slice(), &rest].concat()),
        1 => id_text(140).prop_map(|id| format!("sensors/{id}").into_bytes()),
        1 => (id_text(20), id_text(40)).prop_map(|(site, m)| format!("site/{site}/meters/{m}").into_bytes()),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..256),
        3 => payload_like().prop_map(String::into_bytes),
        1 => (finite_value(), any::<u8>()).prop_map(|(v, style)| spelled(v, style).into_bytes()),
    ]
}

proptest! {
    #[test]
    fn any_message_yields_valid_readings_or_a_counted_reject(topic in topic(), payload in payload()) {
        let (readings, rejects) = decode(&topic, &payload);
        for r in &readings {
            prop_assert!(r.validate().is_ok(), "{r:?} does not validate");
            prop_assert!(validate_ts_at(r.ts, NOW, SKEW).is_ok(), "{r:?} is too far ahead");
        }
        // Nothing is dropped silently: a message without readings was counted.
        prop_assert!(!readings.is_empty() || !rejects.is_empty(), "no readings and no reject");
    }

    #[test]
    fn oversized_payloads_are_rejected_as_too_large(extra in 1usize..1000, fill in any::<u8>()) {
        let payload = vec![fill; MAX_PAYLOAD + extra];
        prop_assert_eq!(decode(b"sensors/a", &payload), (vec![], vec![Reject::TooLarge]));
    }

    #[test]
    fn a_bare_number_is_one_reading_at_the_receive_time(
        id in id_text(MAX_SENSOR_ID_LEN),
        value in finite_value(),
        style in any::<u8>(),
        pad in prop_oneof![Just(""), Just(" "), Just("\n"), Just(" \t\r\n")],
    ) {
        let payload = format!("{pad}{}{pad}", spelled(value, style));
        let (readings, rejects) = decode(format!("sensors/{id}").as_bytes(), payload.as_bytes());
        prop_assert_eq!(rejects, vec![]);
        prop_assert_eq!(bits(&readings), vec![(id, NOW, value.to_bits())], "payload {:?}", payload);
    }

    #[test]
    fn an_object_with_value_is_exactly_that_reading(
        id in id_text(MAX_SENSOR_ID_LEN),
        value in finite_value(),
        ts in proptest::option::of(accepted_ts()),
        style in any::<u8>(),
        extra in proptest::collection::vec((id_text(12), prop_oneof![
            Just("\"text\"".to_string()),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("[1, 2]".to_string()),
            Just("{\"a\": 1}".to_string()),
            finite_value().prop_map(|v| serde_json::to_string(&v).unwrap()),
        ]), 0..4),
    ) {
        let mut fields = vec![format!("\"value\": {}", json_number(value, style))];
        if let Some(ts) = ts {
            fields.push(format!("\"ts\": {ts}"));
        }
        for (name, v) in &extra {
            if name != "value" && name != "ts" {
                fields.push(format!("{}: {v}", serde_json::to_string(name).unwrap()));
            }
        }
        let payload = format!("{{{}}}", fields.join(", "));
        let (readings, rejects) = decode(format!("sensors/{id}").as_bytes(), payload.as_bytes());
        prop_assert_eq!(rejects, vec![]);
        prop_assert_eq!(bits(&readings), vec![(id, ts.unwrap_or(NOW), value.to_bits())], "payload {}", payload);
    }

    #[test]
    fn a_multi_field_object_is_one_reading_per_numeric_field(
        id in id_text(48),
        fields in proptest::collection::btree_map(id_text(40), (finite_value(), any::<u8>()), 1..12),
        ts in proptest::option::of(accepted_ts()),
        noise in proptest::collection::btree_map("[A-Z]{1,6}", prop_oneof![
            Just("\"1.5\"".to_string()),
            Just("false".to_string()),
            Just("null".to_string()),
            Just("[]".to_string()),
        ], 0..3),
    ) {
        let fields: Vec<(String, (f64, u8))> = fields.into_iter().filter(|(n, _)| n != "value" && n != "ts").collect();
        prop_assume!(!fields.is_empty());
        let mut parts: Vec<String> = fields
            .iter()
            .map(|(name, (v, style))| format!("{}: {}", serde_json::to_string(name).unwrap(), json_number(*v, *style)))
            .collect();
        // Non-numeric fields (upper-case names, never among the numeric ones) are ignored.
        parts.extend(noise.iter().map(|(name, v)| format!("\"{name}\": {v}")));
        if let Some(ts) = ts {
            parts.insert(parts.len() / 2, format!("\"ts\": {ts}"));
        }
        let payload = format!("{{{}}}", parts.join(","));
        let (readings, rejects) = decode(format!("sensors/{id}").as_bytes(), payload.as_bytes());
        prop_assert_eq!(rejects, vec![]);
        let expected: Vec<(String, i64, u64)> =
            fields.iter().map(|(name, (v, _))| (format!("{id}/{name}"), ts.unwrap_or(NOW), v.to_bits())).collect();
        prop_assert_eq!(bits(&readings), expected, "payload {}", payload);
    }
}

/// A number in JSON: the shortest round-trip form, or an exponent form.
fn json_number(value: f64, style: u8) -> String {
    match style % 3 {
        0 => serde_json::to_string(&value).expect("finite"),
        1 => format!("{value:e}"),
        _ => format!("{value:E}"),
    }
}
