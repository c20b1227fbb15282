//! MQTT message → readings: topic to sensor id, payload parsing, validation, caps.
//!
//! Payloads on `<prefix>/<sensor-id>`:
//! - a bare number: `21.5`;
//! - an object with `value` (and optional `ts`, Unix ms): one reading, other fields ignored;
//! - an object without `value`: one reading per numeric field, id `<sensor-id>/<field>`; `ts` is the
//!   timestamp, non-numeric fields are ignored.
//!
//! Without `ts` the reading gets the agent's receive time.
//!
//! Two caps keep one misbehaving publisher from flooding everything downstream with sensor ids (each
//! id costs state in the aggregator for good): a message with more than `max_readings_per_message`
//! readings is rejected whole, and at most `max_new_sensors_per_minute` ids the agent has not seen
//! lately are let in per minute ([`SensorLimiter`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use tributary_shared::reading::{ReadingError, validate_sensor_id, validate_ts, validate_ts_at, validate_value};

use crate::config::OnDeviceSkew;

/// Why a message (or one field of it) was not turned into a reading. The label is the
/// `reason` of `tributary_agent_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    TooLarge,
    NonUtf8Topic,
    UnmatchedTopic,
    Malformed,
    NotANumber,
    NoReadings,
    NotFinite,
    BadTimestamp,
    BadSensorId,
    /// More readings in one message than `mqtt.max_readings_per_message`.
    TooManyReadings,
    /// A new sensor id beyond `validation.max_new_sensors_per_minute`.
    SensorLimit,
}

impl Reject {
    pub const ALL: [Reject; 11] = [
        Reject::TooLarge,
        Reject::NonUtf8Topic,
        Reject::UnmatchedTopic,
        Reject::Malformed,
        Reject::NotANumber,
        Reject::NoReadings,
        Reject::NotFinite,
        Reject::BadTimestamp,
        Reject::BadSensorId,
        Reject::TooManyReadings,
        Reject::SensorLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::NonUtf8Topic => "non_utf8_topic",
            Reject::UnmatchedTopic => "unmatched_topic",
            Reject::Malformed => "malformed",
            Reject::NotANumber => "not_a_number",
            Reject::NoReadings => "no_readings",
            Reject::NotFinite => "not_finite",
            Reject::BadTimestamp => "bad_timestamp",
            Reject::BadSensorId => "bad_sensor_id",
            Reject::TooManyReadings => "too_many_readings",
            Reject::SensorLimit => "sensor_limit",
        }
    }

    fn from_reading_error(e: &ReadingError) -> Reject {
        match e {
            ReadingError::NotFinite(_) => Reject::NotFinite,
            ReadingError::TooOld(_) | ReadingError::TooLate(_) | ReadingError::InFuture { .. } => Reject::BadTimestamp,
            _ => Reject::BadSensorId,
        }
    }
}

/// A topic filter and the length of its fixed prefix (the levels before the first wildcard).
#[derive(Debug, Clone)]
struct TopicFilter {
    filter: String,
    prefix_len: usize,
}

impl TopicFilter {
    fn new(filter: &str) -> TopicFilter {
        let mut prefix_len = 0;
        for level in filter.split_inclusive('/') {
            if level.trim_end_matches('/') == "+" || level == "#" {
                break;
            }
            prefix_len += level.len();
        }
        TopicFilter { filter: filter.to_string(), prefix_len }
    }
}

/// Where a reading's timestamp comes from: the agent routes each kind to blocks of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// The agent's receive time.
    Agent,
    /// The device's own timestamp: within the limits, or not judged (the gateway clock has not
    /// been synchronised, so it cannot tell).
    Device,
    /// The device's own timestamp beyond the limits, kept to be sent flagged (`on_device_skew = "flag"`).
    Skewed,
    /// The device's own timestamp beyond the limits, replaced by the agent's receive time
    /// (`on_device_skew = "restamp"`).
    Restamped,
}

/// What the agent does with device timestamps, judged against the synchronised gateway clock.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTsPolicy {
    /// `validation.max_clock_skew`: how far ahead of the gateway clock a device timestamp may be.
    pub max_skew_ms: i64,
    /// `clock.max_device_age`: how far behind it may be (unset: any age).
    pub max_age_ms: Option<i64>,
    pub on_skew: OnDeviceSkew,
}

impl DeviceTsPolicy {
    pub fn new(max_skew_ms: i64) -> DeviceTsPolicy {
        DeviceTsPolicy { max_skew_ms, max_age_ms: None, on_skew: OnDeviceSkew::Reject }
    }

    /// The timestamp and stamp of a reading: the device's `ts` if it has one, else `now`, the
    /// gateway clock (`trusted` once it has been synchronised). Agent stamps of an untrusted clock
    /// are not checked (they may read 1970: the spool re-stamps them). A device timestamp before
    /// 2000 is always an error; beyond the limits of a trusted clock it goes by `on_skew` (an
    /// error for `reject`, whose reason counts as `bad_timestamp` either way).
    pub fn judge(&self, ts: Option<i64>, now: i64, trusted: bool) -> Result<(i64, Stamp), ReadingError> {
        let Some(ts) = ts else {
            if trusted {
                validate_ts(now)?;
            }
            return Ok((now, Stamp::Agent));
        };
        validate_ts(ts)?;
        if !trusted {
            return Ok((ts, Stamp::Device));
        }
        let ahead = validate_ts_at(ts, now, self.max_skew_ms);
        let too_old = self.max_age_ms.is_some_and(|age| ts < now.saturating_sub(age));
        if ahead.is_ok() && !too_old {
            return Ok((ts, Stamp::Device));
        }
        match self.on_skew {
            OnDeviceSkew::Reject => Err(ahead.err().unwrap_or(ReadingError::TooOld(ts))),
            OnDeviceSkew::Restamp => Ok((now, Stamp::Restamped)),
            OnDeviceSkew::Flag => Ok((ts, Stamp::Skewed)),
        }
    }
}

/// Turns MQTT messages into validated readings.
#[derive(Debug, Clone)]
pub struct Decoder {
    filters: Vec<TopicFilter>,
    max_payload_bytes: usize,
    device: DeviceTsPolicy,
    max_readings_per_message: usize,
    sensors: Option<SensorLimiter>,
}

impl Decoder {
    /// A decoder without caps on readings per message or new sensor ids; see [`Decoder::with_caps`].
    pub fn new(topics: &[String], max_payload_bytes: usize, max_skew_ms: i64) -> Decoder {
        Decoder {
            filters: topics.iter().map(|t| TopicFilter::new(t)).collect(),
            max_payload_bytes,
            device: DeviceTsPolicy::new(max_skew_ms),
            max_readings_per_message: usize::MAX,
            sensors: None,
        }
    }

    /// Rejects messages of more than `max_readings_per_message` readings, and lets in at most
    /// `max_new_sensors_per_minute` new sensor ids a minute (0: no limit).
    pub fn with_caps(mut self, max_readings_per_message: usize, max_new_sensors_per_minute: u32) -> Decoder {
        self.max_readings_per_message = max_readings_per_message;
        self.sensors = (max_new_sensors_per_minute > 0).then(|| SensorLimiter::new(max_new_sensors_per_minute));
        self
    }

    /// Device timestamps beyond the skew limit, or older than `max_age_ms`, go by `on_skew`.
    pub fn with_device_policy(mut self, on_skew: OnDeviceSkew, max_age_ms: Option<i64>) -> Decoder {
        self.device.on_skew = on_skew;
        self.device.max_age_ms = max_age_ms;
        self
    }

    pub fn device_policy(&self) -> DeviceTsPolicy {
        self.device
    }

    /// The sensor id a topic maps to: the topic after the first matching filter's fixed prefix
    /// (the whole topic when that leaves nothing, as for a filter without wildcards).
    pub fn sensor_id<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let f = self.filters.iter().find(|f| topic_matches(topic, &f.filter))?;
        let id = topic.get(f.prefix_len..).unwrap_or("");
        Some(if id.is_empty() { topic } else { id })
    }

    /// Decodes one message, handing each reading to `emit` (sensor id, ts, value). Calls `reject`
    /// at most once for the message as a whole, or once per unusable field of a multi-field object.
    /// Returns how many readings were emitted.
    pub fn decode(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        now_ms: i64,
        mut emit: impl FnMut(&str, i64, f64),
        reject: impl FnMut(Reject),
    ) -> usize {
        self.decode_stamped(topic, payload, now_ms, true, |sensor, ts, value, _| emit(sensor, ts, value), reject)
    }

    /// As [`Decoder::decode`], with the gateway clock's trust (`trusted`: synchronised) and each
    /// reading's [`Stamp`].
    pub fn decode_stamped(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        now_ms: i64,
        trusted: bool,
        mut emit: impl FnMut(&str, i64, f64, Stamp),
        mut reject: impl FnMut(Reject),
    ) -> usize {
        match self.decode_message(topic, payload, now_ms, trusted, &mut emit, &mut reject) {
            Ok(n) => n,
            Err(r) => {
                reject(r);
                0
            }
        }
    }

    fn decode_message(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        now_ms: i64,
        trusted: bool,
        emit: &mut impl FnMut(&str, i64, f64, Stamp),
        reject: &mut impl FnMut(Reject),
    ) -> Result<usize, Reject> {
        if payload.len() > self.max_payload_bytes {
            return Err(Reject::TooLarge);
        }
        let topic = std::str::from_utf8(topic).map_err(|_| Reject::NonUtf8Topic)?;
        let sensor = self.sensor_id(topic).ok_or(Reject::UnmatchedTopic)?;
        validate_sensor_id(sensor).map_err(|_| Reject::BadSensorId)?;
        let check_value = |value: f64| validate_value(value).map_err(|e| Reject::from_reading_error(&e));

        let text = std::str::from_utf8(payload).map_err(|_| Reject::Malformed)?.trim();
        if !text.starts_with('{') {
            let value: f64 = text.parse().map_err(|_| {
                if text.starts_with('"') || text.starts_with('[') || text.is_empty() {
                    Reject::NotANumber
                } else {
                    Reject::Malformed
                }
            })?;
            check_value(value)?;
            self.admit(sensor, now_ms)?;
            emit(sensor, now_ms, value, Stamp::Agent);
            return Ok(1);
        }

        let object: Object = serde_json::from_str(text).map_err(|_| Reject::Malformed)?;
        let ts = match object.ts {
            None => None,
            Some(Field::Number(ts)) if ts.fract() == 0.0 && ts.abs() < 9.0e15 => Some(ts as i64),
            Some(_) => return Err(Reject::BadTimestamp),
        };
        // The timestamp concerns the whole message: check it once, before any reading goes out.
        let (ts, stamp) = self.device.judge(ts, now_ms, trusted).map_err(|e| Reject::from_reading_error(&e))?;
        match object.value {
            Some(Field::Number(value)) => {
                check_value(value)?;
                self.admit(sensor, now_ms)?;
                emit(sensor, ts, value, stamp);
                Ok(1)
            }
            Some(Field::Other) => Err(Reject::NotANumber),
            None => {
                if object.fields.len() > self.max_readings_per_message {
                    return Err(Reject::TooManyReadings);
                }
                let mut emitted = 0;
                let mut rejected = false;
                let mut id = String::with_capacity(sensor.len() + 16);
                for (name, value) in object.fields {
                    id.clear();
                    id.push_str(sensor);
                    id.push('/');
                    id.push_str(&name);
                    let checked = validate_sensor_id(&id)
                        .map_err(|_| Reject::BadSensorId)
                        .and_then(|()| check_value(value))
                        .and_then(|()| self.admit(&id, now_ms));
                    match checked {
                        Ok(()) => {
                            emit(&id, ts, value, stamp);
                            emitted += 1;
                        }
                        Err(r) => {
                            reject(r);
                            rejected = true;
                        }
                    }
                }
                // A message whose every field was counted as rejected is not counted again.
                match (emitted, rejected) {
                    (0, false) => Err(Reject::NoReadings),
                    _ => Ok(emitted),
                }
            }
        }
    }

    fn admit(&mut self, sensor: &str, now_ms: i64) -> Result<(), Reject> {
        match &mut self.sensors {
            Some(limiter) => match limiter.admit(sensor, now_ms) {
                true => Ok(()),
                false => Err(Reject::SensorLimit),
            },
            None => Ok(()),
        }
    }
}

/// Lets in at most `per_minute` sensor ids a minute that it has not seen lately: a token bucket
/// holding up to a minute's worth (the burst of a gateway's start), refilled continuously.
///
/// It remembers the ids it let in, in two generations of at most `generation` ids each: an id
/// seen in the older generation moves to the current one; when the current one is full, the older
/// one is forgotten. So memory stays bounded, and the ids of a fleet that fits in a generation are
/// never forgotten (a forgotten id that comes back counts as new again).
#[derive(Debug, Clone)]
pub struct SensorLimiter {
    per_minute: u32,
    tokens: f64,
    last_ms: Option<i64>,
    generation: usize,
    current: HashSet<Box<str>>,
    older: HashSet<Box<str>>,
}

impl SensorLimiter {
    /// Remembers up to 2 x max(50,000, 10 x `per_minute`) ids: 100,000 by default, a few MiB.
    pub fn new(per_minute: u32) -> SensorLimiter {
        SensorLimiter::with_generation(per_minute, (per_minute as usize).saturating_mul(10).max(50_000))
    }

    fn with_generation(per_minute: u32, generation: usize) -> SensorLimiter {
        SensorLimiter {
            per_minute,
            tokens: per_minute as f64,
            last_ms: None,
            generation,
            current: HashSet::new(),
            older: HashSet::new(),
        }
    }

    /// Whether readings of `sensor` may pass at `now_ms`.
    pub fn admit(&mut self, sensor: &str, now_ms: i64) -> bool {
        if self.current.contains(sensor) {
            return true;
        }
        if let Some(id) = self.older.take(sensor) {
            self.remember(id);
            return true;
        }
        // A clock that steps back refills nothing.
        let elapsed = self.last_ms.map_or(0, |last| now_ms.saturating_sub(last).max(0));
        self.last_ms = Some(self.last_ms.map_or(now_ms, |last| last.max(now_ms)));
        let max = self.per_minute as f64;
        self.tokens = (self.tokens + elapsed as f64 * max / 60_000.0).min(max);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        self.remember(sensor.into());
        true
    }

    fn remember(&mut self, id: Box<str>) {
        if self.current.len() >= self.generation {
            self.older = std::mem::take(&mut self.current);
        }
        self.current.insert(id);
    }
}

/// A JSON object payload: `value`, `ts`, and the numeric fields (keys borrowed where possible).
struct Object<'a> {
    value: Option<Field>,
    ts: Option<Field>,
    fields: Vec<(Cow<'a, str>, f64)>,
}

/// A field's value: a number, or anything else (kept only as "not a number").
enum Field {
    Number(f64),
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Field, E> {
                Ok(Field::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
                Ok(Field::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
                Ok(Field::Number(v as f64))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E>(self) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Object<'de>, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                let mut object = Object { value: None, ts: None, fields: Vec::new() };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let field: Field = map.next_value()?;
                    match key.as_ref() {
                        "value" => object.value = Some(field),
                        "ts" => object.ts = Some(field),
                        _ => {
                            if let Field::Number(v) = field {
                                object.fields.push((key, v));
                            }
                        }
                    }
                }
                Ok(object)
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest; `$` topics match no wildcard at the
/// start). rumqttc's `matches` panics on a topic whose first character is more than one byte.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::Reading;

    const NOW: i64 = 1_764_000_000_000;

    fn decode(topic: &str, payload: &str) -> (Vec<Reading>, Vec<Reject>) {
        let mut decoder = Decoder::new(&["sensors/#".to_string(), "site/+/meters/#".to_string()], 1024, 300_000);
        let mut out = Vec::new();
        let mut rejects = Vec::new();
        let n = decoder.decode(
            topic.as_bytes(),
            payload.as_bytes(),
            NOW,
            |sensor, ts, value| out.push(reading(sensor, ts, value)),
            |r| rejects.push(r),
        );
        assert_eq!(n, out.len());
        (out, rejects)
    }

    fn reading(sensor: &str, ts: i64, value: f64) -> Reading {
        Reading { sensor: sensor.into(), ts, value }
    }

    #[test]
    fn bare_numbers_get_the_receive_time() {
        assert_eq!(decode("sensors/room1/temp", " 21.5\n").0, [reading("room1/temp", NOW, 21.5)]);
    }

    #[test]
    fn an_object_with_value_is_one_reading_whatever_else_it_holds() {
        let (out, rej) = decode("sensors/a", r#"{"value": 3, "ts": 1763999999000, "unit": "C", "battery": 80}"#);
        assert_eq!(out, [reading("a", 1_763_999_999_000, 3.0)]);
        assert!(rej.is_empty());
    }

    #[test]
    fn an_object_without_value_is_one_reading_per_numeric_field() {
        let (out, rej) = decode(
            "sensors/dev-1",
            r#"{"temperature": 21.5, "humidity": 40, "ts": 1764000000000, "fw": "1.2", "ok": true}"#,
        );
        assert_eq!(out, [reading("dev-1/temperature", NOW, 21.5), reading("dev-1/humidity", NOW, 40.0)]);
        assert!(rej.is_empty());
    }

    #[test]
    fn the_sensor_id_is_the_topic_after_the_fixed_prefix() {
        assert_eq!(decode("site/berlin/meters/m1", "1").0[0].sensor, "berlin/meters/m1");
        assert_eq!(decode("other/topic", "1").1, [Reject::UnmatchedTopic]);
        let exact = Decoder::new(&["home/kitchen/temp".to_string()], 1024, 0);
        assert_eq!(exact.sensor_id("home/kitchen/temp"), Some("home/kitchen/temp"));
    }

    #[test]
    fn bad_payloads_are_rejected_with_a_reason() {
        let cases = [
            ("NaN", Reject::NotFinite),
            ("inf", Reject::NotFinite),
            ("hello", Reject::Malformed),
            ("\"21.5\"", Reject::NotANumber),
            ("", Reject::NotANumber),
            ("{\"value\": \"abc\"}", Reject::NotANumber),
            ("{\"value\": 1", Reject::Malformed),
            ("{\"fw\": \"1.2\"}", Reject::NoReadings),
            ("{}", Reject::NoReadings),
            ("{\"value\": 1, \"ts\": 12}", Reject::BadTimestamp),
            ("{\"value\": 1, \"ts\": \"yesterday\"}", Reject::BadTimestamp),
            ("{\"a\": 1, \"b\": 2, \"ts\": 1764000400000}", Reject::BadTimestamp),
            ("{\"value\": 1e999}", Reject::Malformed),
        ];
        for (payload, reason) in cases {
            let (out, rej) = decode("sensors/x", payload);
            assert!(out.is_empty(), "{payload}");
            assert_eq!(rej, [reason], "{payload}");
        }
        let mut big = "1".repeat(1025);
        assert_eq!(decode("sensors/x", &big).1, [Reject::TooLarge]);
        big.truncate(1000);
        assert_eq!(decode("sensors/x", &big).1, [Reject::NotFinite], "a 1000-digit number overflows to infinity");
    }

    #[test]
    fn topics_match_filters_like_mqtt_and_any_first_character_is_fine() {
        for (topic, filter, expected) in [
            ("sensors/a/b", "sensors/#", true),
            ("sensors", "sensors/#", true),
            ("sensors/a", "sensors/+", true),
            ("sensors/a/b", "sensors/+", false),
            ("other/a", "sensors/#", false),
            ("é/temp", "#", true),
            ("é/temp", "+/temp", true),
            ("€", "sensors/#", false),
            ("$SYS/x", "#", false),
            ("$SYS/x", "$SYS/#", true),
            ("a", "a", true),
            ("a/b", "a", false),
        ] {
            assert_eq!(topic_matches(topic, filter), expected, "{topic} ~ {filter}");
        }
        let mut d = Decoder::new(&["#".into()], 1024, 300_000);
        let (mut n, mut bad) = (0, 0);
        d.decode("é/temp".as_bytes(), b"21.5", 1_764_000_000_000, |_, _, _| n += 1, |_| bad += 1);
        assert_eq!((n, bad), (1, 0));
    }

    #[test]
    fn non_utf8_topics_are_rejected() {
        let mut decoder = Decoder::new(&["sensors/#".to_string()], 1024, 0);
        let mut rejects = Vec::new();
        decoder.decode(b"sensors/\xff", b"1", NOW, |_, _, _| {}, |r| rejects.push(r));
        assert_eq!(rejects, [Reject::NonUtf8Topic]);
    }

    fn stamped(decoder: &mut Decoder, payload: &str, now: i64, trusted: bool) -> (Vec<(i64, Stamp)>, Vec<Reject>) {
        let (mut out, mut rejects) = (Vec::new(), Vec::new());
        decoder.decode_stamped(
            b"sensors/a",
            payload.as_bytes(),
            now,
            trusted,
            |_, ts, _, stamp| out.push((ts, stamp)),
            |r| rejects.push(r),
        );
        (out, rejects)
    }

    #[test]
    fn an_unsynchronised_clock_stamps_in_1970_and_does_not_judge_device_timestamps() {
        let mut decoder = Decoder::new(&["sensors/#".to_string()], 1024, 300_000);
        let boot_1970 = 5_000;
        assert_eq!(stamped(&mut decoder, "21.5", boot_1970, false).0, [(boot_1970, Stamp::Agent)]);
        assert_eq!(stamped(&mut decoder, r#"{"value": 1}"#, boot_1970, false).0, [(boot_1970, Stamp::Agent)]);
        // Synchronised, the same clock reading is an error (as before the clock section).
        assert_eq!(stamped(&mut decoder, r#"{"value": 1}"#, boot_1970, true).1, [Reject::BadTimestamp]);
        // A device timestamp far ahead of a 1970 clock is not judged by it; one before 2000 still fails.
        assert_eq!(
            stamped(&mut decoder, r#"{"value": 1, "ts": 1764000000000}"#, boot_1970, false).0,
            [(1_764_000_000_000, Stamp::Device)]
        );
        assert_eq!(stamped(&mut decoder, r#"{"value": 1, "ts": 12}"#, boot_1970, false).1, [Reject::BadTimestamp]);
    }

    #[test]
    fn device_timestamps_beyond_the_limits_go_by_on_device_skew() {
        let ahead = format!(r#"{{"value": 1, "ts": {}}}"#, NOW + 300_001);
        let old = format!(r#"{{"value": 1, "ts": {}}}"#, NOW - 86_400_001);
        let fine = format!(r#"{{"value": 1, "ts": {}}}"#, NOW - 1_000);
        let day = Some(86_400_000);
        let mut reject =
            Decoder::new(&["sensors/#".to_string()], 1024, 300_000).with_device_policy(OnDeviceSkew::Reject, day);
        assert_eq!(stamped(&mut reject, &ahead, NOW, true).1, [Reject::BadTimestamp]);
        assert_eq!(stamped(&mut reject, &old, NOW, true).1, [Reject::BadTimestamp]);
        assert_eq!(stamped(&mut reject, &fine, NOW, true).0, [(NOW - 1_000, Stamp::Device)]);
        let mut restamp =
            Decoder::new(&["sensors/#".to_string()], 1024, 300_000).with_device_policy(OnDeviceSkew::Restamp, day);
        assert_eq!(stamped(&mut restamp, &ahead, NOW, true).0, [(NOW, Stamp::Restamped)]);
        assert_eq!(stamped(&mut restamp, &old, NOW, true).0, [(NOW, Stamp::Restamped)]);
        let mut flag =
            Decoder::new(&["sensors/#".to_string()], 1024, 300_000).with_device_policy(OnDeviceSkew::Flag, None);
        assert_eq!(stamped(&mut flag, &ahead, NOW, true).0, [(NOW + 300_001, Stamp::Skewed)]);
        assert_eq!(stamped(&mut flag, &old, NOW, true).0, [(NOW - 86_400_001, Stamp::Device)], "no age limit set");
    }

    #[test]
    fn old_readings_are_accepted_future_ones_beyond_the_skew_are_not() {
        assert_eq!(decode("sensors/a", r#"{"value": 1, "ts": 1000000000000}"#).0.len(), 1);
        assert_eq!(decode("sensors/a", r#"{"value": 1, "ts": 1764000300000}"#).0.len(), 1);
        assert_eq!(decode("sensors/a", r#"{"value": 1, "ts": 1764000300001}"#).1, [Reject::BadTimestamp]);
    }

    fn capped(max_readings: usize, max_new_per_minute: u32) -> Decoder {
        Decoder::new(&["sensors/#".to_string()], 1 << 20, 300_000).with_caps(max_readings, max_new_per_minute)
    }

    fn run(decoder: &mut Decoder, topic: &str, payload: &str, now: i64) -> (Vec<String>, Vec<Reject>) {
        let (mut ids, mut rejects) = (Vec::new(), Vec::new());
        decoder.decode(
            topic.as_bytes(),
            payload.as_bytes(),
            now,
            |s, _, _| ids.push(s.to_string()),
            |r| rejects.push(r),
        );
        (ids, rejects)
    }

    fn object_of(fields: usize) -> String {
        let fields: Vec<String> = (0..fields).map(|i| format!("\"f{i}\": {i}")).collect();
        format!("{{{}}}", fields.join(", "))
    }

    #[test]
    fn a_message_of_more_readings_than_the_cap_is_rejected_whole() {
        let mut decoder = capped(3, 0);
        assert_eq!(run(&mut decoder, "sensors/d", &object_of(3), NOW).0.len(), 3);
        assert_eq!(run(&mut decoder, "sensors/d", &object_of(4), NOW), (vec![], vec![Reject::TooManyReadings]));
        assert_eq!(run(&mut decoder, "sensors/d", &object_of(5_000), NOW), (vec![], vec![Reject::TooManyReadings]));
        // With `value`, the other fields are not readings and do not count.
        let one = format!("{{\"value\": 1, {}", &object_of(10)[1..]);
        assert_eq!(run(&mut decoder, "sensors/d", &one, NOW), (vec!["d".to_string()], vec![]));
    }

    #[test]
    fn new_sensor_ids_beyond_the_limit_are_rejected_while_known_ones_pass() {
        let mut decoder = capped(1_000, 3);
        for id in ["a", "b", "c"] {
            assert_eq!(run(&mut decoder, &format!("sensors/{id}"), "1", NOW).1, []);
        }
        assert_eq!(run(&mut decoder, "sensors/d", "1", NOW), (vec![], vec![Reject::SensorLimit]));
        assert_eq!(run(&mut decoder, "sensors/a", r#"{"value": 2}"#, NOW).0, ["a"], "a known id always passes");
        // 3 a minute: one new id every 20 s.
        assert_eq!(run(&mut decoder, "sensors/d", "1", NOW + 19_000).1, [Reject::SensorLimit]);
        assert_eq!(run(&mut decoder, "sensors/d", "1", NOW + 20_000).1, []);
        assert_eq!(run(&mut decoder, "sensors/e", "1", NOW + 20_000).1, [Reject::SensorLimit]);
        // A clock that steps back refills nothing; a long pause refills a minute's worth only.
        assert_eq!(run(&mut decoder, "sensors/e", "1", NOW - 3_600_000).1, [Reject::SensorLimit]);
        let later = NOW + 3_600_000;
        let passed = (0..10).filter(|i| run(&mut decoder, &format!("sensors/n{i}"), "1", later).1.is_empty()).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn a_multi_field_message_is_limited_field_by_field_and_counted_once_per_field() {
        let mut decoder = capped(1_000, 2);
        let (ids, rejects) = run(&mut decoder, "sensors/dev", r#"{"t": 1, "h": 2, "p": 3, "ts": 1764000000000}"#, NOW);
        assert_eq!(ids, ["dev/t", "dev/h"]);
        assert_eq!(rejects, [Reject::SensorLimit]);
        // Every field refused: each counted, the message not counted again as no_readings.
        let (ids, rejects) = run(&mut decoder, "sensors/other", r#"{"x": 1, "y": 2}"#, NOW);
        assert!(ids.is_empty());
        assert_eq!(rejects, [Reject::SensorLimit, Reject::SensorLimit]);
        assert_eq!(run(&mut decoder, "sensors/dev", r#"{"t": 4, "h": 5}"#, NOW).0, ["dev/t", "dev/h"]);
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_ids_and_keeps_the_active_ones() {
        let mut limiter = SensorLimiter::with_generation(1_000, 2);
        for id in ["a", "b", "c"] {
            assert!(limiter.admit(id, NOW));
        }
        let tokens = limiter.tokens;
        // "a" is in the older generation: it moves back to the current one, no token spent.
        assert!(limiter.admit("a", NOW));
        assert_eq!(limiter.tokens, tokens);
        // A new id fills the current generation: the older one ("b") is forgotten.
        assert!(limiter.admit("d", NOW));
        assert!(limiter.current.len() + limiter.older.len() <= 4);
        assert!(limiter.admit("b", NOW));
        assert_eq!(limiter.tokens, tokens - 2.0, "b was forgotten, so it counted as new again");
        for i in 0..10_000 {
            limiter.admit(&format!("flood-{i}"), NOW);
        }
        assert!(limiter.current.len() + limiter.older.len() <= 4, "memory stays bounded under a flood");
    }

    #[test]
    fn without_caps_nothing_is_limited() {
        let mut decoder = Decoder::new(&["sensors/#".to_string()], 1 << 20, 300_000);
        assert_eq!(run(&mut decoder, "sensors/d", &object_of(5_000), NOW).0.len(), 5_000);
    }
}
