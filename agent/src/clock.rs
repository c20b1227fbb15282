//! The gateway's clock, and what the agent does while it cannot be trusted.
//!
//! Many gateways have no real-time clock: they boot in 1970, or at the time of their last
//! shutdown, until NTP sets the clock. Readings the agent stamps itself before that first
//! synchronisation go into blocks flagged [`BlockClock::Unsynced`], which record the boot and
//! the wall clock's offset from the boot-time clock (`CLOCK_BOOTTIME`, which counts from boot
//! whatever the wall clock does). The forwarder holds those blocks back for up to
//! `[clock] hold_unsynced`; when the clock is first synchronised, the [`ClockWatcher`] has the
//! spool re-stamp them (each reading moves by the difference between the offset now and the one
//! it was stamped with: [`restamp`]) and they go out as ordinary blocks. Blocks of an earlier
//! boot, or held longer than allowed, go out flagged, and the aggregator quarantines them.
//!
//! Once synchronised, the clock stays trusted for the life of the process: a clock set by NTP
//! only drifts if the kernel later reports it unsynchronised.
//!
//! [`SystemClock`] asks the kernel (adjtimex); [`FakeClock`] is for unit tests and
//! [`FakeClockFile`] for end-to-end tests, which cannot move the machine's clock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tributary_shared::{Block, BlockClock};

use crate::config::{ClockConfig, SyncCheck};
use crate::metrics::Metrics;
use crate::spool::Spool;

/// Test-only: the path of a fake clock file ([`FakeClockFile`]) the agent reads instead of the
/// kernel's clock state. Never set it on a gateway.
pub const FAKE_CLOCK_ENV: &str = "TRIBUTARY_FAKE_CLOCK";

/// Where the agent's time comes from.
pub trait ClockSource: Send + Sync {
    /// Wall-clock time, Unix ms.
    fn wall_ms(&self) -> i64;
    /// Time since boot, ms (`CLOCK_BOOTTIME`: counts through suspend, never steps).
    fn boot_ms(&self) -> i64;
    /// Whether the wall clock is synchronised (e.g. by NTP).
    fn synced(&self) -> bool;
    /// Identifies this boot (`/proc/sys/kernel/random/boot_id`).
    fn boot_id(&self) -> [u8; 16];
}

/// The kernel's clocks; synchronised as adjtimex says (or always, with `sync_check = "none"`).
pub struct SystemClock {
    check: SyncCheck,
    boot_id: [u8; 16],
}

impl SystemClock {
    pub fn new(check: SyncCheck) -> SystemClock {
        SystemClock { check, boot_id: system_boot_id() }
    }
}

impl ClockSource for SystemClock {
    fn wall_ms(&self) -> i64 {
        crate::spool::now_ms()
    }

    fn boot_ms(&self) -> i64 {
        boottime_ms()
    }

    fn synced(&self) -> bool {
        match self.check {
            SyncCheck::None => true,
            // Where the kernel cannot be asked, trust the clock as the agent always did.
            SyncCheck::Adjtimex => kernel_clock_synced().unwrap_or(true),
        }
    }

    fn boot_id(&self) -> [u8; 16] {
        self.boot_id
    }
}

/// `CLOCK_BOOTTIME` in ms.
pub fn boottime_ms() -> i64 {
    // SAFETY: clock_gettime fills the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as i64 * 1000 + ts.tv_nsec as i64 / 1_000_000
}

/// Whether the kernel considers the clock synchronised (adjtimex: not `TIME_ERROR`, no
/// `STA_UNSYNC`). `None` where it cannot be asked.
pub fn kernel_clock_synced() -> Option<bool> {
    // SAFETY: adjtimex with modes 0 only reads the kernel's state into the struct we pass.
    let mut timex: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut timex) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && timex.status & libc::STA_UNSYNC == 0)
}

/// This boot's id, from `/proc/sys/kernel/random/boot_id` (a UUID); all zeros where it cannot be
/// read, which makes every boot look the same (re-stamping then trusts the boot-time clock).
pub fn system_boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().and_then(|s| parse_uuid(&s)).unwrap_or([0; 16])
}

fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// A clock for unit tests: wall and boot time move only when told to.
#[derive(Clone)]
pub struct FakeClock(Arc<Mutex<FakeState>>);

struct FakeState {
    wall_ms: i64,
    boot_ms: i64,
    synced: bool,
    boot_id: [u8; 16],
}

impl FakeClock {
    /// An unsynchronised clock reading `wall_ms`, `boot_ms` after boot `boot_id`.
    pub fn new(wall_ms: i64, boot_ms: i64, boot_id: [u8; 16]) -> FakeClock {
        FakeClock(Arc::new(Mutex::new(FakeState { wall_ms, boot_ms, synced: false, boot_id })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Time passes: both clocks move by `ms`.
    pub fn advance(&self, ms: i64) {
        let mut s = self.state();
        s.wall_ms += ms;
        s.boot_ms += ms;
    }

    /// The wall clock is set (stepped) to `wall_ms`; the boot-time clock does not move.
    pub fn set_wall(&self, wall_ms: i64) {
        self.state().wall_ms = wall_ms;
    }

    pub fn set_synced(&self, synced: bool) {
        self.state().synced = synced;
    }
}

impl ClockSource for FakeClock {
    fn wall_ms(&self) -> i64 {
        self.state().wall_ms
    }
    fn boot_ms(&self) -> i64 {
        self.state().boot_ms
    }
    fn synced(&self) -> bool {
        self.state().synced
    }
    fn boot_id(&self) -> [u8; 16] {
        self.state().boot_id
    }
}

/// Test-only, selected by [`FAKE_CLOCK_ENV`]: the machine's clocks with the wall clock moved by
/// an offset and the synchronised flag taken from a file the test rewrites, e.g.
/// `wall_offset_ms=-1764000000000\nsynced=0\n` (a gateway that booted in 1970). Optional
/// `boot_id=<32 hex digits>` replaces the boot id (a "new boot"). Read at most every 20 ms; a
/// file that cannot be read leaves the last values.
pub struct FakeClockFile {
    path: PathBuf,
    state: Mutex<(Option<Instant>, FakeFileState)>,
}

#[derive(Clone, Copy)]
struct FakeFileState {
    wall_offset_ms: i64,
    synced: bool,
    boot_id: [u8; 16],
}

impl FakeClockFile {
    pub fn new(path: PathBuf) -> FakeClockFile {
        let state = FakeFileState { wall_offset_ms: 0, synced: false, boot_id: system_boot_id() };
        FakeClockFile { path, state: Mutex::new((None, state)) }
    }

    fn current(&self) -> FakeFileState {
        let mut guard = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.0.is_none_or(|at| at.elapsed() >= Duration::from_millis(20)) {
            guard.0 = Some(Instant::now());
            if let Ok(text) = std::fs::read_to_string(&self.path) {
                for line in text.lines() {
                    match line.trim().split_once('=') {
                        Some(("wall_offset_ms", v)) => {
                            if let Ok(v) = v.trim().parse() {
                                guard.1.wall_offset_ms = v;
                            }
                        }
                        Some(("synced", v)) => guard.1.synced = v.trim() == "1",
                        Some(("boot_id", v)) => {
                            if let Some(id) = parse_uuid(v) {
                                guard.1.boot_id = id;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        guard.1
    }
}

impl ClockSource for FakeClockFile {
    fn wall_ms(&self) -> i64 {
        crate::spool::now_ms() + self.current().wall_offset_ms
    }
    fn boot_ms(&self) -> i64 {
        boottime_ms()
    }
    fn synced(&self) -> bool {
        self.current().synced
    }
    fn boot_id(&self) -> [u8; 16] {
        self.current().boot_id
    }
}

/// The clock as the agent's stages share it: the source and whether it has been synchronised
/// since the agent started (once it has, it stays trusted).
pub struct Clock {
    source: Box<dyn ClockSource>,
    trusted: AtomicBool,
}

/// One reading of the clock, for stamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock time, Unix ms.
    pub wall_ms: i64,
    /// The clock has been synchronised in this life of the agent.
    pub trusted: bool,
    /// Wall clock minus boot-time clock, ms.
    pub offset_ms: i64,
    pub boot_id: [u8; 16],
}

impl Now {
    /// The flag of a block of readings stamped now.
    pub fn unsynced_flag(&self) -> BlockClock {
        BlockClock::Unsynced { boot_id: self.boot_id, offset_ms: self.offset_ms }
    }
}

impl Clock {
    /// The kernel's clock, or the fake one [`FAKE_CLOCK_ENV`] names (tests).
    pub fn from_config(config: &ClockConfig) -> Clock {
        match std::env::var_os(FAKE_CLOCK_ENV) {
            Some(path) if !path.is_empty() => {
                tracing::warn!(path = %PathBuf::from(&path).display(), "{FAKE_CLOCK_ENV} is set: using a FAKE clock (test-only)");
                Clock::new(Box::new(FakeClockFile::new(path.into())))
            }
            _ => Clock::new(Box::new(SystemClock::new(config.sync_check))),
        }
    }

    pub fn new(source: Box<dyn ClockSource>) -> Clock {
        Clock { source, trusted: AtomicBool::new(false) }
    }

    /// Whether the clock has been synchronised since the agent started (asks the source until it has).
    pub fn trusted(&self) -> bool {
        if self.trusted.load(Ordering::Relaxed) {
            return true;
        }
        let synced = self.source.synced();
        if synced {
            self.trusted.store(true, Ordering::Relaxed);
        }
        synced
    }

    /// Wall-clock time, Unix ms.
    pub fn wall_ms(&self) -> i64 {
        self.source.wall_ms()
    }

    pub fn boot_ms(&self) -> i64 {
        self.source.boot_ms()
    }

    pub fn boot_id(&self) -> [u8; 16] {
        self.source.boot_id()
    }

    /// The time and how far to trust it.
    pub fn now(&self) -> Now {
        let trusted = self.trusted();
        let boot = self.source.boot_ms();
        let wall_ms = self.source.wall_ms();
        Now { wall_ms, trusted, offset_ms: wall_ms - boot, boot_id: self.source.boot_id() }
    }
}

/// Moves an [`BlockClock::Unsynced`] block stamped in boot `boot_id` onto the synchronised clock,
/// whose wall clock now reads `offset_ms` ahead of the boot-time clock: every reading moves by
/// the difference between that offset and the one it was stamped with, and the flag goes.
/// `None` for a block of another boot (its boot-time clock is lost) or one not flagged unsynced.
pub fn restamp(block: &Block, boot_id: [u8; 16], offset_ms: i64) -> Option<Block> {
    let BlockClock::Unsynced { boot_id: stamped_in, offset_ms: stamped_offset } = block.clock else { return None };
    if stamped_in != boot_id {
        return None;
    }
    let shift = offset_ms.saturating_sub(stamped_offset);
    let mut out = block.clone();
    out.clock = BlockClock::Synced;
    for e in &mut out.entries {
        e.ts = e.ts.saturating_add(shift);
        // A time no synchronised block may carry (before 2000, after 9999: offsets gone wild):
        // the block stays flagged and is quarantined, never refused whole by the aggregator.
        tributary_shared::reading::validate_ts(e.ts).ok()?;
    }
    Some(out)
}

/// Watches the clock: at its first synchronisation (or at start, if it is synchronised already),
/// tells the spool to re-stamp what it holds of this boot; publishes the sync state as a metric.
pub struct ClockWatcher {
    pub clock: Arc<Clock>,
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
}

/// How often the watcher looks at the clock while it is not synchronised.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

impl ClockWatcher {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if self.clock.trusted() {
                self.metrics.clock_synced.set(1);
                let now = self.clock.now();
                tracing::info!(wall_ms = now.wall_ms, "the clock is synchronised; re-stamping what was stamped before");
                if self.spool.restamp(now.boot_id, now.offset_ms).is_err() {
                    tracing::warn!(
                        "the spool stopped before the readings stamped by an unsynchronised clock could be re-stamped"
                    );
                }
                return;
            }
            self.metrics.clock_synced.set(0);
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::{BlockBuilder, MIN_TS_MS};

    const BOOT: [u8; 16] = [3; 16];
    const REAL: i64 = 1_764_000_000_000;

    fn stamped(clock: &Clock, sensor: &str, builder: &mut BlockBuilder) -> Now {
        let now = clock.now();
        builder.push(sensor, now.wall_ms, 1.0);
        now
    }

    #[test]
    fn readings_stamped_in_1970_land_at_their_real_time_after_the_first_sync() {
        // Booted 5 s ago in 1970; the first reading now, the second 10 s later.
        let fake = FakeClock::new(5_000, 5_000, BOOT);
        let clock = Clock::new(Box::new(fake.clone()));
        let mut b = BlockBuilder::default();
        let first = stamped(&clock, "a", &mut b);
        assert!(!first.trusted);
        assert!(first.wall_ms < MIN_TS_MS, "stamped in 1970");
        fake.advance(10_000);
        stamped(&clock, "a", &mut b);
        let block = Block { clock: first.unsynced_flag(), ..b.finish() };
        assert_eq!(block.validate(), Ok(()), "an unsynced block may hold 1970");
        assert!(Block { clock: BlockClock::Synced, ..block.clone() }.validate().is_err());

        // 20 s after the first reading NTP sets the clock: it is REAL now.
        fake.advance(10_000);
        fake.set_wall(REAL);
        fake.set_synced(true);
        let now = clock.now();
        assert!(now.trusted);
        let fixed = restamp(&block, now.boot_id, now.offset_ms).unwrap();
        assert_eq!(fixed.clock, BlockClock::Synced);
        let ts: Vec<i64> = fixed.entries.iter().map(|e| e.ts).collect();
        assert_eq!(ts, [REAL - 20_000, REAL - 10_000]);
        assert_eq!(fixed.validate(), Ok(()));
    }

    #[test]
    fn a_stale_clock_stepped_back_within_a_block_keeps_each_readings_boot_time() {
        // Booted at the last shutdown's time (stale), then stepped back by a wrong RTC-less guess,
        // still unsynced: readings are kept in the first reading's frame by the stamper, so what
        // matters is the offset each was stamped with.
        let stale = REAL - 86_400_000;
        let fake = FakeClock::new(stale, 1_000, BOOT);
        let clock = Clock::new(Box::new(fake.clone()));
        let before = clock.now();
        fake.advance(1_000);
        fake.set_wall(stale - 3_600_000);
        let after = clock.now();
        assert_eq!(after.offset_ms - before.offset_ms, -3_601_000);
        // The stamper re-bases a reading stamped `after` into the block's frame (see Intake):
        let rebased = after.wall_ms - after.offset_ms + before.offset_ms;
        let mut b = BlockBuilder::default();
        b.push("a", before.wall_ms, 1.0);
        b.push("a", rebased, 2.0);
        let block = Block { clock: before.unsynced_flag(), ..b.finish() };
        fake.advance(1_000);
        fake.set_wall(REAL);
        fake.set_synced(true);
        let now = clock.now();
        let fixed = restamp(&block, now.boot_id, now.offset_ms).unwrap();
        let ts: Vec<i64> = fixed.entries.iter().map(|e| e.ts).collect();
        assert_eq!(ts, [REAL - 2_000, REAL - 1_000], "1 s apart, as the boot-time clock says");
    }

    #[test]
    fn blocks_of_an_earlier_boot_and_synced_blocks_are_not_restamped() {
        let mut b = BlockBuilder::default();
        b.push("a", 10_000, 1.0);
        let earlier = Block { clock: BlockClock::Unsynced { boot_id: [9; 16], offset_ms: 0 }, ..b.finish() };
        assert_eq!(restamp(&earlier, BOOT, REAL), None);
        let synced = Block { clock: BlockClock::Synced, ..earlier.clone() };
        assert_eq!(restamp(&synced, [9; 16], REAL), None);
        assert_eq!(restamp(&earlier, [9; 16], REAL).unwrap().entries[0].ts, REAL + 10_000);
    }

    #[test]
    fn a_block_that_restamping_would_put_outside_2000_to_9999_stays_flagged() {
        let mut b = BlockBuilder::default();
        b.push("a", 10_000, 1.0);
        b.push("a", 20_000, 2.0);
        let block = Block { clock: BlockClock::Unsynced { boot_id: BOOT, offset_ms: 0 }, ..b.finish() };
        // An offset that leaves the readings in 1970, or one past the year 9999.
        assert_eq!(restamp(&block, BOOT, 1_000), None);
        assert_eq!(restamp(&block, BOOT, i64::MAX), None);
        assert!(restamp(&block, BOOT, REAL).is_some());
    }

    #[test]
    fn once_synchronised_the_clock_stays_trusted() {
        let fake = FakeClock::new(REAL, 1_000, BOOT);
        let clock = Clock::new(Box::new(fake.clone()));
        assert!(!clock.trusted());
        fake.set_synced(true);
        assert!(clock.trusted());
        fake.set_synced(false);
        assert!(clock.trusted(), "a clock NTP set only drifts once NTP is gone");
    }

    #[test]
    fn the_fake_clock_file_moves_the_wall_clock_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        std::fs::write(&path, "wall_offset_ms=-1000000000000\nsynced=0\nboot_id=000102030405060708090a0b0c0d0e0f\n")
            .unwrap();
        let fake = FakeClockFile::new(path.clone());
        assert!(!fake.synced());
        assert!((fake.wall_ms() - (crate::spool::now_ms() - 1_000_000_000_000)).abs() < 5_000);
        assert_eq!(fake.boot_id()[15], 15);
        std::fs::write(&path, "wall_offset_ms=0\nsynced=1\n").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(fake.synced());
        assert!((fake.wall_ms() - crate::spool::now_ms()).abs() < 5_000);
    }

    #[test]
    fn the_kernel_clocks_answer() {
        assert!(kernel_clock_synced().is_some());
        assert!(boottime_ms() > 0);
        assert_ne!(system_boot_id(), [0; 16]);
        assert_eq!(parse_uuid("00112233-4455-6677-8899-aabbccddeeff\n").unwrap()[15], 0xff);
    }
}
