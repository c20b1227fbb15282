//! JSON for the API's large answers (window lists), written straight into one buffer.
//!
//! A fleet read (1,000 sensors' last hour of 1-minute windows) is 60,000 windows and ~13 MB;
//! through serde_json's serializer more than half of its time went to escaping the same 15 keys
//! per window and to small copies into the response. The writer here produces the same bytes as
//! `serde_json::to_vec` of [`WindowView`] (a test holds it to that) in a fraction of the time,
//! and runs in the blocking thread that read the windows, not on an async worker.

use crate::api::{Point, WindowView};

/// Roughly what one window costs in JSON, to size the buffer once.
pub const WINDOW_BYTES: usize = 230;

/// The members of a window, in the order they are written.
pub const FIELDS: [&str; 14] = [
    "start",
    "end",
    "count",
    "min",
    "max",
    "mean",
    "stddev",
    "first",
    "last",
    "p50",
    "p95",
    "p99",
    "revision",
    "updated_at",
];

/// Which members of each window an answer carries (`?fields=start,mean,max`): a fleet overview
/// or a chart needs three or four of the fourteen, and the answer shrinks by as much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields(u16);

impl Fields {
    pub const ALL: Fields = Fields((1 << FIELDS.len()) - 1);
    const QUANTILES: u16 = 0b111 << 9;

    /// A comma-separated list of member names; empty or absent means all.
    pub fn parse(text: Option<&str>) -> Result<Fields, String> {
        let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(Fields::ALL) };
        let mut bits = 0;
        for name in text.split(',').map(str::trim) {
            match FIELDS.iter().position(|f| *f == name) {
                Some(i) => bits |= 1 << i,
                None => return Err(format!("fields: unknown member {name:?}; a window has {}", FIELDS.join(","))),
            }
        }
        Ok(Fields(bits))
    }

    pub(crate) fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    /// Whether any quantile is asked for (they are the costly members to compute).
    pub fn quantiles(self) -> bool {
        self.0 & Fields::QUANTILES != 0
    }
}

/// `[{window}, ...]`
pub fn windows(out: &mut Vec<u8>, windows: &[WindowView], fields: Fields) {
    out.push(b'[');
    for (i, w) in windows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        window(out, w, fields);
    }
    out.push(b']');
}

/// `{"sensor": name, "windows": [...]}`
pub fn sensor_windows(out: &mut Vec<u8>, sensor: &str, list: &[WindowView], fields: Fields) {
    out.extend_from_slice(b"{\"sensor\":");
    string(out, sensor);
    out.extend_from_slice(b",\"windows\":");
    windows(out, list, fields);
    out.push(b'}');
}

/// The CSV header of a window list: `sensor`, then the chosen members (`first` and `last` as
/// `first_ts,first_value`).
pub fn csv_header(out: &mut Vec<u8>, fields: Fields) {
    out.extend_from_slice(b"sensor");
    for (i, name) in FIELDS.iter().enumerate() {
        if !fields.has(i) {
            continue;
        }
        match *name {
            "first" | "last" => {
                out.push(b',');
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"_ts,");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"_value");
            }
            _ => {
                out.push(b',');
                out.extend_from_slice(name.as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// One CSV row per window (RFC 4180; a value that is not a finite number is empty). Times
/// (`start`, `end`, `first_ts`, `last_ts`, `updated_at`) are ISO-8601 with their offset, as a
/// spreadsheet or `pandas.read_csv(parse_dates=...)` reads them.
pub fn csv_rows(out: &mut Vec<u8>, sensor: &str, list: &[WindowView], fields: Fields) {
    let mut quoted = Vec::new();
    if sensor.contains([',', '"', '\r', '\n']) {
        quoted.push(b'"');
        quoted.extend_from_slice(sensor.replace('"', "\"\"").as_bytes());
        quoted.push(b'"');
    } else {
        quoted.extend_from_slice(sensor.as_bytes());
    }
    let cell = |out: &mut Vec<u8>, v: f64| {
        if v.is_finite() {
            float(out, v);
        }
    };
    for w in list {
        out.extend_from_slice(&quoted);
        for (i, value) in values(w).iter().enumerate() {
            if !fields.has(i) {
                continue;
            }
            out.push(b',');
            match value {
                Value::Int(v) => int(out, *v),
                Value::Time(ms) => out.extend_from_slice(crate::series::iso8601(*ms).as_bytes()),
                Value::Count(v) => int(out, *v),
                Value::Float(v) => cell(out, *v),
                Value::Point(p) => {
                    out.extend_from_slice(crate::series::iso8601(p.ts).as_bytes());
                    out.push(b',');
                    cell(out, p.value);
                }
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A member's value.
enum Value<'a> {
    Int(i64),
    /// Unix milliseconds.
    Time(i64),
    Count(u64),
    Float(f64),
    Point(&'a Point),
}

/// A window's members, in [`FIELDS`] order.
fn values(w: &WindowView) -> [Value<'_>; FIELDS.len()] {
    let WindowView { start, end, count, min, max, mean, stddev, first, last, p50, p95, p99, revision, updated_at } = w;
    [
        Value::Time(*start),
        Value::Time(*end),
        Value::Count(*count),
        Value::Float(*min),
        Value::Float(*max),
        Value::Float(*mean),
        Value::Float(*stddev),
        Value::Point(first),
        Value::Point(last),
        Value::Float(*p50),
        Value::Float(*p95),
        Value::Float(*p99),
        Value::Int(i64::from(*revision)),
        Value::Time(*updated_at),
    ]
}

fn window(out: &mut Vec<u8>, w: &WindowView, fields: Fields) {
    let mut separator = b'{';
    let seen = &mut Repeats::default();
    // Each key a literal, in FIELDS order: a copy of known length is a few moves, where a key
    // looked up by index is a call to memcpy, and a fleet read writes 840,000 keys.
    macro_rules! member {
        ($i:literal, $key:literal, $write:expr) => {
            if fields.has($i) {
                debug_assert_eq!(FIELDS[$i], $key);
                out.push(separator);
                separator = b',';
                out.extend_from_slice(concat!("\"", $key, "\":").as_bytes());
                $write;
            }
        };
    }
    member!(0, "start", time(out, w.start));
    member!(1, "end", time(out, w.end));
    member!(2, "count", small(out, w.count));
    member!(3, "min", seen.float(out, w.min));
    member!(4, "max", seen.float(out, w.max));
    member!(5, "mean", seen.float(out, w.mean));
    member!(6, "stddev", seen.float(out, w.stddev));
    member!(7, "first", point(out, &w.first, seen));
    member!(8, "last", point(out, &w.last, seen));
    member!(9, "p50", seen.float(out, w.p50));
    member!(10, "p95", seen.float(out, w.p95));
    member!(11, "p99", seen.float(out, w.p99));
    member!(12, "revision", small(out, u64::from(w.revision)));
    member!(13, "updated_at", time(out, w.updated_at));
    if separator == b'{' {
        out.push(b'{');
    }
    out.push(b'}');
}

fn point(out: &mut Vec<u8>, p: &Point, seen: &mut Repeats) {
    out.extend_from_slice(b"{\"ts\":");
    time(out, p.ts);
    out.extend_from_slice(b",\"value\":");
    seen.float(out, p.value);
    out.push(b'}');
}

/// The floats a window has written so far, and where: a window of one or two readings repeats
/// its values (min = first = p50, max = last = p99), and copying a number back is cheaper than
/// formatting it again. (Integers are not worth it: `itoa` is as fast as the lookup and copy.)
#[derive(Default)]
struct Repeats {
    bits: [u64; 4],
    at: [usize; 4],
    len: [usize; 4],
    used: usize,
}

impl Repeats {
    fn float(&mut self, out: &mut Vec<u8>, v: f64) {
        let bits = v.to_bits();
        if let Some(i) = self.bits[..self.used].iter().position(|b| *b == bits) {
            let at = self.at[i];
            out.extend_from_within(at..at + self.len[i]);
            return;
        }
        let at = out.len();
        float(out, v);
        if self.used < self.bits.len() {
            let i = self.used;
            (self.bits[i], self.at[i], self.len[i]) = (bits, at, out.len() - at);
            self.used += 1;
        }
    }
}

fn int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    number(out, itoa::Buffer::new().format(v).as_bytes());
}

/// A time in Unix milliseconds (13 digits for 2001–2286) as two groups of eight digits, each
/// found at once and written in one store ([`digits8`]): a fleet read writes five a window, and
/// `itoa`'s two digits a step plus a copy were a fifth of the answer's instructions.
fn time(out: &mut Vec<u8>, v: i64) {
    const LOW: i64 = 100_000_000;
    if !(LOW..LOW * LOW).contains(&v) {
        return int(out, v);
    }
    let high = digits8((v / LOW) as u32);
    // The high group is at least 1: its leading zero digits are its low zero bytes.
    let lead = high.trailing_zeros() / 8;
    put(out, (high | ASCII) >> (8 * lead), 8 - lead as usize);
    put(out, digits8((v % LOW) as u32) | ASCII, 8);
}

/// A count or revision: below 10^8 as [`time`] writes its groups, else by `itoa`.
fn small(out: &mut Vec<u8>, v: u64) {
    if v == 0 || v >= 100_000_000 {
        return int(out, v);
    }
    let digits = digits8(v as u32);
    let lead = digits.trailing_zeros() / 8;
    put(out, (digits | ASCII) >> (8 * lead), 8 - lead as usize);
}

/// Adds `'0'` to each of eight digit values.
const ASCII: u64 = 0x3030_3030_3030_3030;

/// The eight decimal digits of `n` (< 10^8), leading zeros kept, as byte values (0–9) with the
/// first digit in the low byte, so that `to_le_bytes` is their order. Splits into 4-, 2- and
/// 1-digit lanes of one u64 (SWAR), each division by 100 or 10 a multiply and shift that is exact
/// for its lane's range.
fn digits8(n: u32) -> u64 {
    let n = u64::from(n);
    let x = (n / 10_000) | ((n % 10_000) << 32);
    let hundreds = ((x * 10_486) >> 20) & 0x0000_007f_0000_007f;
    let y = hundreds | ((x - hundreds * 100) << 16);
    let tens = ((y * 103) >> 10) & 0x000f_000f_000f_000f;
    tens | ((y - tens * 10) << 8)
}

/// Appends the first `n` (at most 8) bytes of `bytes`, low byte first: one 8-byte store whatever
/// `n`, where a copy of `n` bytes is a call to memcpy.
#[inline(always)]
fn put(out: &mut Vec<u8>, bytes: u64, n: usize) {
    debug_assert!(n <= 8);
    out.reserve(8);
    let spare = out.spare_capacity_mut();
    let to: &mut [std::mem::MaybeUninit<u8>; 8] = (&mut spare[..8]).try_into().expect("8 bytes reserved");
    *to = bytes.to_le_bytes().map(std::mem::MaybeUninit::new);
    // SAFETY: the store above initialised the first 8 spare bytes (reserved above), and n <= 8.
    unsafe { out.set_len(out.len() + n.min(8)) };
}

/// As serde_json writes an f64: shortest round-trip form, `null` for NaN and infinities.
fn float(out: &mut Vec<u8>, v: f64) {
    if short_decimal(out, v) {
        return;
    }
    if v.is_finite() {
        number(out, zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Writes `v` if it is a decimal of at most four places (21.5, 12.019: what sensors send, and so
/// most of a window's min, max, first, last and quantiles), in the shortest round-trip form
/// `zmij` would write, at a fraction of its cost; false (nothing written) otherwise.
///
/// Why it is the same text: `n / 10^4` rounds to exactly `v`, so its digits read back as `v`; below
/// 10^9 a double's spacing is under 10^-6, so no other decimal of four places or fewer reads back
/// as `v`, and the digits with trailing zeros cut are the shortest that do.
fn short_decimal(out: &mut Vec<u8>, v: f64) -> bool {
    const SCALE: f64 = 10_000.0;
    let a = v.abs();
    // `zmij` writes plain decimals in this range (exponents below 10^-4 and from 10^16 on).
    if !(1e-3..1e9).contains(&a) {
        return false;
    }
    let scaled = (a * SCALE).round();
    if scaled / SCALE != a {
        return false;
    }
    let n = scaled as u64;
    if v < 0.0 {
        out.push(b'-');
    }
    let fraction = if n < 100_000_000 {
        // Up to four digits before the point and four after, all in one group: `IIIIFFFF`, with
        // the whole part's leading zeros dropped but its last digit kept.
        let digits = digits8(n as u32);
        let lead = (digits.trailing_zeros() / 8).min(3);
        put(out, ((digits | ASCII) & 0xffff_ffff) >> (8 * lead), 4 - lead as usize);
        digits
    } else {
        small(out, n / 10_000);
        digits8((n % 10_000) as u32)
    };
    // The fraction is the group's high four bytes; its trailing zeros (its high zero bytes) are
    // cut, keeping at least one digit (`20.0`).
    let trail = (fraction.leading_zeros() / 8).min(3);
    out.push(b'.');
    put(out, (fraction | ASCII) >> 32, 4 - trail as usize);
    true
}

/// Appends a formatted number (at most 40 bytes) with two fixed-size, overlapping copies instead
/// of a call to memcpy: a fleet read writes 800,000 numbers, and the calls were a tenth of it.
#[inline(always)]
fn number(out: &mut Vec<u8>, digits: &[u8]) {
    let n = digits.len();
    if n > 32 {
        out.extend_from_slice(digits);
        return;
    }
    out.reserve(32);
    let spare = out.spare_capacity_mut();
    match n {
        16.. => {
            copy_fixed::<16>(spare, 0, digits);
            copy_fixed::<16>(spare, n - 16, digits);
        }
        8.. => {
            copy_fixed::<8>(spare, 0, digits);
            copy_fixed::<8>(spare, n - 8, digits);
        }
        4.. => {
            copy_fixed::<4>(spare, 0, digits);
            copy_fixed::<4>(spare, n - 4, digits);
        }
        _ => {
            for (to, from) in spare.iter_mut().zip(digits) {
                to.write(*from);
            }
        }
    }
    // SAFETY: the two copies wrote `digits[..n]` into the first `n` spare bytes (reserved above).
    unsafe { out.set_len(out.len() + n) };
}

/// `spare[at..at + N] = digits[at..at + N]`, a copy of constant length.
#[inline(always)]
fn copy_fixed<const N: usize>(spare: &mut [std::mem::MaybeUninit<u8>], at: usize, digits: &[u8]) {
    let from: &[u8; N] = digits[at..at + N].try_into().expect("N bytes");
    let to: &mut [std::mem::MaybeUninit<u8>; N] = (&mut spare[at..at + N]).try_into().expect("N bytes");
    *to = from.map(std::mem::MaybeUninit::new);
}

/// Sensor ids are few per answer and may need escaping: serde_json does it.
fn string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_of_every_length_are_copied_whole() {
        let mut out = Vec::new();
        let mut expected = String::new();
        for digits in 0..=40 {
            let text: String = (0..digits).map(|i| char::from(b'0' + (i % 10) as u8)).collect();
            // Appended after an odd number of bytes, so no copy starts aligned.
            out.push(b'|');
            number(&mut out, text.as_bytes());
            expected.push('|');
            expected.push_str(&text);
        }
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn times_and_counts_are_the_digits_itoa_writes() {
        let mut values = vec![0, 1, -1, 99_999_999, 100_000_000, 100_000_001, 1_764_630_004_896, 9_999_999_999_999_999];
        values.extend([10_000_000_000_000_000, i64::MAX, i64::MIN, -100_000_000, 1_000_000_000_000]);
        values.extend((0..100_000_000).step_by(9_973).map(|n| 1_764_600_000_000 + n));
        let mut rng = fastrand::Rng::with_seed(7);
        values.extend((0..100_000).map(|_| rng.i64(..)));
        values.extend((0..100_000).map(|_| rng.i64(946_684_800_000..253_402_300_799_999)));
        for v in values {
            let mut out = Vec::new();
            time(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        let counts =
            (0..1_000).chain([99_999_999, 100_000_000, u64::MAX]).chain((0..100_000).map(|_| rng.u64(..1 << 30)));
        for v in counts {
            let mut out = Vec::new();
            small(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
    }

    #[test]
    fn short_decimals_are_the_digits_zmij_writes() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut values = vec![0.001, 0.0011, 0.0019999, 0.0999, 1.0, 20.75, 12.019, 999_999_999.999_9, 999_999_999.0];
        values.extend([1e9, 0.000_999_9, 0.0001, 1e-5, 0.1 + 0.2, 1.0 / 3.0, 123_456_789.123_4, 5e-324, 1e308]);
        for scale in [1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0] {
            // Decimals of up to four places (the fast path) and of more (zmij's).
            values.extend((0..20_000).map(|_| rng.i64(-10_000_000_000_000..10_000_000_000_000) as f64 / scale / 1e4));
            values.extend((0..20_000).map(|_| rng.i64(-100_000..100_000) as f64 / scale));
        }
        values.extend((0..100_000).map(|_| f64::from_bits(rng.u64(..))));
        values.extend((0..100_000).map(|_| rng.f64() * 100.0));
        let mut fast = 0;
        for v in values {
            let mut ours = Vec::new();
            fast += usize::from(short_decimal(&mut ours, v));
            ours.clear();
            float(&mut ours, v);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&v).unwrap(), "{v:e}");
        }
        // The fast path is taken (the comparison above would pass without it).
        assert!(fast > 100_000, "{fast} short decimals");
    }

    fn view(seed: f64) -> WindowView {
        WindowView {
            start: -62_135_596_800_000,
            end: 253_402_300_799_999,
            count: u64::MAX,
            min: -1e308,
            max: 1e308,
            mean: seed,
            stddev: 0.0,
            first: Point { ts: 0, value: -0.0 },
            last: Point { ts: i64::MIN, value: f64::MIN_POSITIVE },
            p50: 5e-324,
            p95: f64::NAN,
            p99: f64::INFINITY,
            revision: u32::MAX,
            updated_at: i64::MAX,
        }
    }

    #[test]
    fn writes_the_bytes_serde_json_writes() {
        let list: Vec<WindowView> =
            [0.1, 1.0 / 3.0, 26.234, -1e-7, 123456789.0, 1e21, 1e-300].into_iter().map(view).collect();
        let mut ours = Vec::new();
        windows(&mut ours, &list, Fields::ALL);
        assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&list).unwrap());

        // Windows of one or two readings repeat values, some written from the copy kept of
        // the first; five distinct floats is more than that copy holds.
        let repeats = |a: f64, b: f64, c: f64, d: f64, e: f64| WindowView {
            min: a,
            max: b,
            mean: c,
            stddev: d,
            first: Point { ts: 1, value: e },
            last: Point { ts: 2, value: a },
            p50: b,
            p95: e,
            p99: -0.0,
            ..view(a)
        };
        let list = [
            repeats(21.5, 21.5, 21.5, 0.0, 21.5),
            repeats(12.019, 20.415, 16.217, 4.198, 20.415),
            repeats(1.0, 2.0, 3.0, 4.0, 5.0),
            repeats(f64::NAN, f64::NAN, 0.0, -0.0, f64::INFINITY),
        ];
        let mut ours = Vec::new();
        windows(&mut ours, &list, Fields::ALL);
        assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&list).unwrap());

        let mut ours = Vec::new();
        sensor_windows(&mut ours, "line\"1/\u{1}é", &list[..2], Fields::ALL);
        #[derive(serde::Serialize)]
        struct SensorWindows<'a> {
            sensor: &'a str,
            windows: &'a [WindowView],
        }
        let theirs = SensorWindows { sensor: "line\"1/\u{1}é", windows: &list[..2] };
        assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&theirs).unwrap());

        let mut ours = Vec::new();
        windows(&mut ours, &[], Fields::ALL);
        assert_eq!(ours, b"[]");
    }

    #[test]
    fn writes_only_the_fields_asked_for_in_their_order() {
        let fields = Fields::parse(Some(" mean,start ,last")).unwrap();
        assert!(!fields.quantiles());
        let mut ours = Vec::new();
        windows(&mut ours, &[view(2.5)], fields);
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            r#"[{"start":-62135596800000,"mean":2.5,"last":{"ts":-9223372036854775808,"value":2.2250738585072014e-308}}]"#
        );
        assert_eq!(Fields::parse(None), Ok(Fields::ALL));
        assert_eq!(Fields::parse(Some("")), Ok(Fields::ALL));
        assert!(Fields::parse(Some("p95")).unwrap().quantiles());
        let err = Fields::parse(Some("mean,avg")).unwrap_err();
        assert!(err.contains("\"avg\"") && err.contains("start,end,count"), "{err}");
        assert!(Fields::parse(Some("mean,,max")).is_err());
    }
}
