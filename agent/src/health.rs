//! The gateway's own health as readings of its own sensors, `_agent/<id>/<what>`, spooled and
//! forwarded like any other: stored, windowed and alerted on at the aggregator (e.g.
//! `[[alerts]] sensor = "_agent/*/disk_free_bytes", below = 1e8`).
//!
//! Every `[health] interval`: `cpu` (the agent's CPU use since the last sample, in % of one
//! core), `rss_bytes`, `disk_free_bytes` (of the spool's file system, for unprivileged users),
//! `spool_bytes`, `spool_readings`, and `clock_synced` (1 when the kernel says the clock is
//! synchronised, e.g. by NTP; 0 when not). Stamped like every reading the agent stamps
//! (see [`crate::clock`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::clock::kernel_clock_synced;
use crate::decode::Stamp;
use crate::input::Intake;
use crate::metrics::Metrics;
use crate::spool::SpoolError;

/// Samples the health readings and hands them to `intake` until `stop`.
pub struct Health {
    pub agent_id: String,
    pub data_dir: PathBuf,
    pub interval: std::time::Duration,
    pub metrics: Arc<Metrics>,
}

impl Health {
    pub async fn run(self, mut intake: Intake, mut stop: watch::Receiver<bool>) -> Result<(), SpoolError> {
        // The first sample after one interval, not at start (a restart loop would flood).
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_cpu = (Instant::now(), cpu_seconds());
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            // Stamped like any reading the agent stamps: re-stamped if the clock is not synchronised yet.
            let now = intake.clock_now();
            for (what, value) in self.sample(&mut last_cpu) {
                intake.take_stamped(
                    &format!("_agent/{}/{what}", self.agent_id),
                    now.wall_ms,
                    value,
                    Stamp::Agent,
                    &now,
                );
            }
            intake.try_flush()?;
        }
        // With what the pre-filters still hold (a `**` rule applies to these readings too).
        intake.finish().await
    }

    fn sample(&self, last_cpu: &mut (Instant, Option<f64>)) -> Vec<(&'static str, f64)> {
        let mut out = Vec::with_capacity(6);
        let (at, cpu) = (Instant::now(), cpu_seconds());
        if let (Some(before), Some(now)) = (last_cpu.1, cpu) {
            let wall = at.duration_since(last_cpu.0).as_secs_f64();
            if wall > 0.0 {
                out.push(("cpu", ((now - before) / wall * 100.0).max(0.0)));
            }
        }
        *last_cpu = (at, cpu);
        if let Some(rss) = rss_bytes() {
            out.push(("rss_bytes", rss as f64));
        }
        if let Some(free) = disk_free_bytes(&self.data_dir) {
            out.push(("disk_free_bytes", free as f64));
        }
        out.push(("spool_bytes", self.metrics.spool_bytes.get() as f64));
        out.push(("spool_readings", self.metrics.spool_readings.get() as f64));
        if let Some(synced) = kernel_clock_synced() {
            out.push(("clock_synced", if synced { 1.0 } else { 0.0 }));
        }
        out
    }
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Some(t(usage.ru_utime) + t(usage.ru_stime))
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

fn disk_free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass, for a NUL-terminated path we own.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_answers_on_linux() {
        assert!(cpu_seconds().is_some());
        assert!(rss_bytes().is_some_and(|b| b > 1 << 20));
        assert!(disk_free_bytes(Path::new("/")).is_some());
    }
}
