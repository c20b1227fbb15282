//! Where a timestamp's window starts and ends: fixed sizes aligned on the Unix epoch, or
//! calendar days in an IANA time zone (a DST-change day is 23 or 25 hours long).

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// The `size` code under which calendar days are stored (fixed sizes use their length in ms).
pub const DAYS_CODE: i64 = -1;

#[derive(Debug, Clone)]
pub enum Calendar {
    /// Windows of this many ms, the first starting at the Unix epoch.
    Fixed(i64),
    /// Calendar days in `tz`; window index = days since 1970-01-01 of the local date.
    Days { tz: TimeZone, name: String },
}

const DAY_MS: i64 = 86_400_000;

impl Calendar {
    pub fn fixed(size_ms: i64) -> Calendar {
        Calendar::Fixed(size_ms.max(1))
    }

    /// Calendar days in the IANA zone `name` (e.g. `Europe/Berlin`).
    pub fn days(name: &str) -> Result<Calendar, String> {
        let tz = TimeZone::get(name).map_err(|e| format!("unknown time zone {name:?}: {e}"))?;
        Ok(Calendar::Days { tz, name: name.to_string() })
    }

    /// The code windows of this calendar are stored under.
    pub fn code(&self) -> i64 {
        match self {
            Calendar::Fixed(size) => *size,
            Calendar::Days { .. } => DAYS_CODE,
        }
    }

    /// Windows per stored row: 20 minutes of fine windows (120 of 10 s), and at least 60. Fewer,
    /// larger rows are fewer B-tree updates per commit: with 10 s windows in rows of 60, a row
    /// of sparse data held about 14 readings and the per-row cost was most of the commit. Not
    /// more: each sensor's newest row stays in memory and is rewritten at every live commit
    /// (rows of an hour of 10 s windows: 1.00 instead of 1.24 M readings/s live, and twice the
    /// memory on dense data).
    pub fn slots(&self) -> i64 {
        match self {
            Calendar::Fixed(size) => (1_200_000 / size).clamp(60, 3_600),
            Calendar::Days { .. } => 60,
        }
    }

    /// (window index, start, end) of the window holding `ts`.
    pub fn bucket(&self, ts: i64) -> (i64, i64, i64) {
        match self {
            Calendar::Fixed(size) => {
                let index = floor_div(ts, *size);
                let start = index.saturating_mul(*size);
                (index, start, start.saturating_add(*size))
            }
            Calendar::Days { tz, .. } => {
                // jiff's last instant is 9999-12-30T22:00Z, a day before event time's (shared::
                // MAX_TS_MS): the last hours of 9999 and queries' open bounds count as that day.
                let ts = ts.clamp(tributary_shared::MIN_TS_MS - 2 * DAY_MS, Timestamp::MAX.as_second() * 1000);
                let date = Timestamp::from_millisecond(ts)
                    .map(|t| t.to_zoned(tz.clone()).date())
                    .unwrap_or(Date::constant(1970, 1, 1));
                let index = day_index(date);
                (index, self.start_of(index), self.start_of(index + 1))
            }
        }
    }

    /// The start (Unix ms) of window `index`.
    pub fn start_of(&self, index: i64) -> i64 {
        match self {
            Calendar::Fixed(size) => index.saturating_mul(*size),
            Calendar::Days { tz, .. } => {
                let date = match Timestamp::from_second(index.saturating_mul(86_400)) {
                    Ok(t) => t.to_zoned(TimeZone::UTC).date(),
                    Err(_) => return index.saturating_mul(DAY_MS),
                };
                // Local midnight; where a DST change skips midnight, the first instant of the day.
                match date.to_zoned(tz.clone()) {
                    Ok(z) => z.timestamp().as_millisecond(),
                    Err(_) => index.saturating_mul(DAY_MS),
                }
            }
        }
    }

    /// The index of the window holding `ts`.
    pub fn index_of(&self, ts: i64) -> i64 {
        self.bucket(ts).0
    }

    /// A name for messages and the API: `1m`, `days(Europe/Berlin)`.
    pub fn label(&self) -> String {
        match self {
            Calendar::Fixed(size) => {
                humantime::format_duration(std::time::Duration::from_millis(*size as u64)).to_string()
            }
            Calendar::Days { name, .. } => format!("days({name})"),
        }
    }
}

/// `x.div_euclid(d)` for `d > 0`, through a floating-point division where both fit its mantissa:
/// a 64-bit integer division takes tens of cycles, and the fold divides twice per reading (its
/// window, then the window's row).
pub fn floor_div(x: i64, d: i64) -> i64 {
    const EXACT: u64 = 1 << 52;
    if x.unsigned_abs() >= EXACT || d.unsigned_abs() >= EXACT || d <= 0 {
        return x.div_euclid(d);
    }
    // Both are exact as f64 and the quotient is correctly rounded, under 2^52 in magnitude:
    // truncated (one instruction; `floor` is a library call without SSE4.1), it is off by one or
    // two at most, which the remainder shows.
    let mut q = (x as f64 / d as f64) as i64;
    let mut r = x - q * d;
    while r < 0 {
        q -= 1;
        r += d;
    }
    while r >= d {
        q += 1;
        r -= d;
    }
    q
}

/// Days from 1970-01-01 to `date`.
fn day_index(date: Date) -> i64 {
    // Civil arithmetic, not through a timestamp: the last days of 9999 are past jiff's last instant.
    Date::constant(1970, 1, 1).until(date).map(|span| i64::from(span.get_days())).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn floor_division_is_div_euclid() {
        let mut rng = fastrand::Rng::with_seed(99);
        let ds =
            [1i64, 2, 3, 7, 60, 120, 1_000, 10_000, 60_000, 3_600_000, 86_400_000, (1 << 52) - 1, 1 << 52, i64::MAX];
        let edges = [0i64, 1, -1, (1 << 52) - 1, 1 << 52, -(1 << 52), 1 << 53, i64::MAX, i64::MIN, i64::MIN + 1];
        for d in ds {
            for x in edges {
                for dx in [-2i64, -1, 0, 1, 2] {
                    let x = x.saturating_add(dx);
                    assert_eq!(floor_div(x, d), x.div_euclid(d), "{x} / {d}");
                }
            }
            for _ in 0..20_000 {
                let r = rng.u64(..);
                // Multiples of d and their neighbours, and times of any size.
                let x = match r % 3 {
                    0 => ((r >> 8) as i64 % (1 << 40)).wrapping_mul(d.min(1 << 20)) + (r >> 60) as i64 - 8,
                    1 => ((r >> (r % 64)) as i64).wrapping_mul(if r & 1 == 0 { 1 } else { -1 }),
                    _ => 1_764_547_200_000 + (r >> 20) as i64 % 100_000_000_000 - 50_000_000_000,
                };
                assert_eq!(floor_div(x, d), x.div_euclid(d), "{x} / {d}");
            }
        }
    }

    #[test]
    fn fixed_windows_align_on_the_epoch() {
        let c = Calendar::fixed(60_000);
        assert_eq!(c.bucket(119_999), (1, 60_000, 120_000));
        assert_eq!(c.bucket(-1), (-1, -60_000, 0));
        assert_eq!(c.start_of(2), 120_000);
    }

    #[test]
    fn berlin_days_are_23_and_25_hours_long_at_the_dst_changes() {
        let c = Calendar::days("Europe/Berlin").unwrap();
        // 2026-03-29: clocks go from 02:00 to 03:00 CET -> CEST.
        let (_, start, end) = c.bucket(ms("2026-03-29T12:00:00Z"));
        assert_eq!(start, ms("2026-03-28T23:00:00Z"));
        assert_eq!(end - start, 23 * 3_600_000);
        // 2026-10-25: clocks go from 03:00 back to 02:00 CEST -> CET.
        let (_, start, end) = c.bucket(ms("2026-10-25T12:00:00Z"));
        assert_eq!(start, ms("2026-10-24T22:00:00Z"));
        assert_eq!(end - start, 25 * 3_600_000);
        // An ordinary winter day, and the edges of a day.
        let (index, start, end) = c.bucket(ms("2026-01-15T22:59:59.999Z"));
        assert_eq!((start, end - start), (ms("2026-01-14T23:00:00Z"), 24 * 3_600_000));
        assert_eq!(c.bucket(ms("2026-01-15T23:00:00Z")).0, index + 1);
        assert_eq!(c.start_of(index), start);
    }

    #[test]
    fn open_query_bounds_clamp_to_the_first_and_last_day_not_1970() {
        let c = Calendar::days("Europe/Berlin").unwrap();
        let last_valid = c.index_of(tributary_shared::MAX_TS_MS);
        assert!(c.index_of(i64::MAX) >= last_valid);
        assert!(c.index_of(i64::MIN) < c.index_of(tributary_shared::MIN_TS_MS));
        assert!(c.index_of(tributary_shared::MAX_TS_MS + 86_400_000) >= last_valid);
        assert!(last_valid > c.index_of(tributary_shared::MAX_TS_MS - 3 * DAY_MS));
    }

    #[test]
    fn unknown_zones_are_refused_with_their_name() {
        assert!(Calendar::days("Mars/Olympus_Mons").unwrap_err().contains("Mars/Olympus_Mons"));
    }
}
