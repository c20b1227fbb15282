//! What an agent tells the aggregator about readings it dropped (`POST /api/v1/gaps`, JSON): the
//! aggregator sees only the hole in the sequence numbers; the agent knows why, which sensors and
//! which hours it held.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Sensor ids a report names at most; `sensor_count` says how many there were.
pub const MAX_REPORTED_SENSORS: usize = 20;
/// Reports one request carries at most.
pub const MAX_GAP_REPORTS: usize = 1_000;

/// The reports of one spool epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GapReports {
    pub agent_id: String,
    pub epoch: u64,
    pub gaps: Vec<GapReport>,
}

/// Readings `from_seq..to_seq` of an epoch that the agent dropped, and why (the aggregator lists
/// them with its gaps, `GET /api/v1/gaps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GapReport {
    pub from_seq: u64,
    pub to_seq: u64,
    pub readings: u64,
    /// Event times of the earliest and latest reading dropped (Unix ms), when known.
    pub first_ts: Option<i64>,
    pub last_ts: Option<i64>,
    /// Up to [`MAX_REPORTED_SENSORS`] of the sensor ids, sorted.
    pub sensors: Vec<String>,
    pub sensor_count: u64,
    /// `spool_full` (`[spool] overflow`), `max_age`, `disk_full`, `corrupt_spool`.
    pub reason: String,
    /// When the agent dropped them (its clock, Unix ms).
    pub recorded_at: i64,
}

#[cfg(feature = "sqlite")]
impl GapReport {
    /// A report from a row that starts `from_seq, to_seq, readings, first_ts, last_ts, sensors,
    /// sensor_count, reason, recorded_at`, as the agent's spool and the aggregator's log both keep
    /// them (`sensors` a JSON array).
    pub fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GapReport> {
        let sensors: String = r.get(5)?;
        Ok(GapReport {
            from_seq: r.get::<_, i64>(0)?.max(0) as u64,
            to_seq: r.get::<_, i64>(1)?.max(0) as u64,
            readings: r.get::<_, i64>(2)?.max(0) as u64,
            first_ts: r.get(3)?,
            last_ts: r.get(4)?,
            sensors: serde_json::from_str(&sensors).unwrap_or_default(),
            sensor_count: r.get::<_, i64>(6)?.max(0) as u64,
            reason: r.get(7)?,
            recorded_at: r.get(8)?,
        })
    }
}
