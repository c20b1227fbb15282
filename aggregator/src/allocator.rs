//! What the allocator does with freed memory while a replay runs.
//!
//! The binary runs jemalloc handing freed pages back to the kernel after 250 ms (src/main.rs): a
//! live aggregator's RSS then follows what it holds. A replay frees a stretch's rows at each
//! commit and takes as much again for the next stretch within the second, so pages handed back
//! came straight back through page faults, the kernel zeroing them and shooting down other
//! cores' TLBs (a tenth of a replay's CPU). While a [`KeepFreedPages`] lives, freed pages stay
//! for [`REPLAY_DECAY_MS`]; the setting is restored when the last one is dropped.

use std::ffi::{CStr, CString, c_void};
use std::sync::Mutex;

/// How long freed pages stay with the process while a replay runs.
pub const REPLAY_DECAY_MS: isize = 2_000;

/// (replays running, each arena's setting before the first of them).
static KEPT: Mutex<(usize, Vec<(u32, isize)>)> = Mutex::new((0, Vec::new()));

/// Keeps freed pages in the process for [`REPLAY_DECAY_MS`] while it lives.
pub struct KeepFreedPages(());

impl KeepFreedPages {
    pub fn new() -> KeepFreedPages {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if kept.0 == 0 {
            kept.1 = arenas().into_iter().filter_map(|i| Some((i, decay(i, Some(REPLAY_DECAY_MS))?))).collect();
        }
        kept.0 += 1;
        KeepFreedPages(())
    }
}

impl Default for KeepFreedPages {
    fn default() -> KeepFreedPages {
        KeepFreedPages::new()
    }
}

impl Drop for KeepFreedPages {
    fn drop(&mut self) {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        kept.0 -= 1;
        if kept.0 == 0 {
            for (arena, ms) in std::mem::take(&mut kept.1) {
                decay(arena, Some(ms));
            }
        }
    }
}

/// The arenas jemalloc has made (the one of the binary's `narenas:1`, and the one it makes for
/// huge allocations).
fn arenas() -> Vec<u32> {
    let mut n: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: "arenas.narenas" is an unsigned, read into a u32 of the length given.
    let read = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arenas.narenas".as_ptr(),
            (&raw mut n).cast::<c_void>(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if read == 0 { (0..n).collect() } else { Vec::new() }
}

/// An arena's dirty-page decay, set to `new` if given; returns what it was (`None`: no such
/// arena, or jemalloc is not there to ask).
fn decay(arena: u32, new: Option<isize>) -> Option<isize> {
    let name = CString::new(format!("arena.{arena}.dirty_decay_ms")).ok()?;
    let name: &CStr = &name;
    let mut old: isize = 0;
    let mut len = std::mem::size_of::<isize>();
    let mut new = new;
    let (newp, newlen) = match new.as_mut() {
        Some(ms) => ((ms as *mut isize).cast::<c_void>(), std::mem::size_of::<isize>()),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: the setting is a ssize_t, read into and written from an isize of the lengths given.
    let done =
        unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), (&raw mut old).cast::<c_void>(), &mut len, newp, newlen) };
    (done == 0).then_some(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_pages_are_kept_while_a_replay_runs_and_the_setting_comes_back() {
        let before = decay(0, None).expect("jemalloc's first arena");
        {
            let _one = KeepFreedPages::new();
            let two = KeepFreedPages::new();
            assert_eq!(decay(0, None), Some(REPLAY_DECAY_MS));
            drop(two);
            assert_eq!(decay(0, None), Some(REPLAY_DECAY_MS), "one replay still runs");
        }
        assert_eq!(decay(0, None), Some(before));
    }
}
