//! One sensor reading and the rules a valid one follows.

use alloc::string::String;
use serde::{Deserialize, Serialize};

/// 2000-01-01T00:00:00Z in Unix ms: anything earlier is a device whose clock was never set.
pub const MIN_TS_MS: i64 = 946_684_800_000;

/// 9999-12-31T23:59:59.999Z in Unix ms: the last instant a four-digit ISO-8601 year can spell.
/// Bounding event time on both ends, here and only here, keeps every window computation
/// (`start + size`, day arithmetic) far from `i64` overflow, wherever a timestamp enters.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Sensor ids are bounded so that a block's intern table and the serving store's keys stay small.
pub const MAX_SENSOR_ID_LEN: usize = 128;

/// A reading: sensor id, event time (Unix ms), value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub sensor: String,
    pub ts: i64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("sensor id is empty")]
    EmptySensorId,
    #[error("sensor id is {len} bytes long, the limit is {MAX_SENSOR_ID_LEN}")]
    SensorIdTooLong { len: usize },
    #[error("sensor id contains {0:?}, which is not allowed (no MQTT wildcards, no control characters)")]
    SensorIdChar(char),
    #[error("value {0} is not a finite number")]
    NotFinite(f64),
    #[error("timestamp {0} ms is before the year 2000; is the device clock set?")]
    TooOld(i64),
    #[error("timestamp {0} ms is after the year 9999; is it in ms, not µs or ns?")]
    TooLate(i64),
    #[error("timestamp {ts} ms is more than {max_skew_ms} ms ahead of the clock ({now} ms)")]
    InFuture { ts: i64, now: i64, max_skew_ms: i64 },
}

/// A sensor id is non-empty, bounded, and usable as an MQTT topic suffix: no `+`, `#`, NUL or
/// other control characters.
pub fn validate_sensor_id(id: &str) -> Result<(), ReadingError> {
    if id.is_empty() {
        return Err(ReadingError::EmptySensorId);
    }
    if id.len() > MAX_SENSOR_ID_LEN {
        return Err(ReadingError::SensorIdTooLong { len: id.len() });
    }
    match id.chars().find(|c| matches!(c, '+' | '#') || c.is_control()) {
        Some(c) => Err(ReadingError::SensorIdChar(c)),
        None => Ok(()),
    }
}

/// A value must be a finite number.
pub fn validate_value(value: f64) -> Result<(), ReadingError> {
    if value.is_finite() { Ok(()) } else { Err(ReadingError::NotFinite(value)) }
}

/// The time bounds that hold everywhere: from 2000 through 9999.
pub fn validate_ts(ts: i64) -> Result<(), ReadingError> {
    if ts < MIN_TS_MS {
        Err(ReadingError::TooOld(ts))
    } else if ts > MAX_TS_MS {
        Err(ReadingError::TooLate(ts))
    } else {
        Ok(())
    }
}

/// Value and timestamp rules that hold everywhere (the agent adds the future-skew check,
/// which needs its clock): finite value, timestamp in [`MIN_TS_MS`, `MAX_TS_MS`].
pub fn validate_value_and_ts(ts: i64, value: f64) -> Result<(), ReadingError> {
    validate_value(value)?;
    validate_ts(ts)
}

/// The agent's timestamp check: after 2000 and no further ahead of `now` than `max_skew_ms`.
/// Old timestamps are fine: a device delivering its backlog is normal.
pub fn validate_ts_at(ts: i64, now: i64, max_skew_ms: i64) -> Result<(), ReadingError> {
    validate_ts(ts)?;
    if ts > now.saturating_add(max_skew_ms) {
        return Err(ReadingError::InFuture { ts, now, max_skew_ms });
    }
    Ok(())
}

/// [`validate_value`] and [`validate_ts_at`] together.
pub fn validate_at(ts: i64, value: f64, now: i64, max_skew_ms: i64) -> Result<(), ReadingError> {
    validate_value(value)?;
    validate_ts_at(ts, now, max_skew_ms)
}

impl Reading {
    /// Checks the id, the value and the lower time bound.
    pub fn validate(&self) -> Result<(), ReadingError> {
        validate_sensor_id(&self.sensor)?;
        validate_value_and_ts(self.ts, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_ids_reject_wildcards_controls_and_overlong() {
        assert!(validate_sensor_id("room1/temp").is_ok());
        assert!(validate_sensor_id("küche/temp").is_ok());
        assert_eq!(validate_sensor_id(""), Err(ReadingError::EmptySensorId));
        assert_eq!(validate_sensor_id("a/+/b"), Err(ReadingError::SensorIdChar('+')));
        assert_eq!(validate_sensor_id("a#"), Err(ReadingError::SensorIdChar('#')));
        assert_eq!(validate_sensor_id("a\0b"), Err(ReadingError::SensorIdChar('\0')));
        let long = "x".repeat(MAX_SENSOR_ID_LEN + 1);
        assert!(matches!(validate_sensor_id(&long), Err(ReadingError::SensorIdTooLong { .. })));
    }

    #[test]
    fn timestamps_may_be_old_but_not_before_2000_nor_far_ahead() {
        let now = 1_764_000_000_000;
        let skew = 300_000;
        assert!(validate_at(now - 86_400_000 * 30, 1.0, now, skew).is_ok());
        assert!(validate_at(now + skew, 1.0, now, skew).is_ok());
        assert!(matches!(validate_at(now + skew + 1, 1.0, now, skew), Err(ReadingError::InFuture { .. })));
        assert_eq!(validate_at(MIN_TS_MS - 1, 1.0, now, skew), Err(ReadingError::TooOld(MIN_TS_MS - 1)));
        assert!(matches!(validate_at(now, f64::NAN, now, skew), Err(ReadingError::NotFinite(_))));
        assert!(matches!(validate_at(now, f64::INFINITY, now, skew), Err(ReadingError::NotFinite(_))));
    }

    #[test]
    fn timestamps_are_bounded_on_both_ends_everywhere() {
        assert_eq!(validate_value_and_ts(MAX_TS_MS, 1.0), Ok(()));
        assert_eq!(validate_value_and_ts(MAX_TS_MS + 1, 1.0), Err(ReadingError::TooLate(MAX_TS_MS + 1)));
        assert_eq!(validate_value_and_ts(i64::MAX, 1.0), Err(ReadingError::TooLate(i64::MAX)));
        assert_eq!(validate_value_and_ts(i64::MIN, 1.0), Err(ReadingError::TooOld(i64::MIN)));
        // The agent's clock check cannot be fooled by a skew that overflows.
        assert!(validate_at(i64::MAX, 1.0, i64::MAX, i64::MAX).is_err());
    }
}
