//! A full disk must not stall the pipeline: the agent keeps forwarding and deleting what the
//! aggregator acknowledged, drops by `spool.overflow`, counts every drop, and recovers when space
//! returns. Runs on a real 8 MiB tmpfs (this needs root to mount); where mounting is refused,
//! SQLite's `max_page_count` stands in for the small file system, and the test says which ran.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tributary_tests::{Agent, Aggregator, eventually, publish};

const TOKEN: &str = "secret-gw-1";
const FS_BYTES: u64 = 8 << 20;

/// A tmpfs mounted for the test; unmounted when dropped.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(path).unwrap();
        let size = format!("size={FS_BYTES}");
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(path).output().ok()?;
        status.status.success().then(|| SmallFs { path: path.to_path_buf() })
    }

    /// Writes a file until the file system refuses: another program filling the disk.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 << 10];
        while file.write_all(&chunk).and_then(|_| file.flush()).is_ok() {}
        let mut byte = [0u8; 1];
        while file.write_all(&byte).is_ok() {
            byte[0] = 1;
        }
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    // Noisy values compress poorly, so the spool fills in a few thousand readings.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    (0..n)
        .map(|_| {
            let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let x = i.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let value = (x >> 11) as f64 / (1u64 << 53) as f64 * 1000.0;
            (format!("sensors/{sensor}"), format!("{value}").into_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_by_policy_while_the_backlog_drains_and_new_readings_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    aggregator.process.kill9();
    let fs = SmallFs::mount(&dir.path().join("agent-data"));
    let env: Vec<(&str, &str)> = match fs {
        Some(_) => {
            eprintln!("full-disk test: the spool is on a real {} MiB tmpfs", FS_BYTES >> 20);
            vec![]
        }
        None => {
            // 512 KiB of 1 KiB pages. Nothing else can fill this "disk", so the drops come from the
            // limit the agent derives from it rather than from SQLITE_FULL.
            eprintln!("full-disk test: mounting a tmpfs was refused; SQLite's max_page_count stands in for it");
            vec![("TRIBUTARY_SPOOL_MAX_PAGE_COUNT", "512")]
        }
    };
    let mut agent = Agent::start_with_env(dir.path(), "gw-1", TOKEN, &aggregator.url(), "", &env).await;
    // spool.max_bytes (1 GiB) does not fit: the agent uses what does, says so and exposes it.
    let limit = agent.metric("tributary_agent_spool_max_bytes").await;

    // Everything published is, once the agent has taken it, stored, dropped or forwarded.
    let mut published = 0u64;
    let accounted = |published: u64| {
        let agent = &agent;
        async move {
            let m = agent.metrics().await;
            let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
            let handled = get("tributary_agent_spool_readings")
                + get("tributary_agent_spool_dropped_readings_total")
                + get("tributary_agent_readings_forwarded_total");
            (handled == published).then_some(())
        }
    };

    // A backlog builds up while the aggregator is down; then something else fills the disk.
    publish(agent.mqtt_port, "early", &messages("early/level", 3000)).await;
    published += 3000;
    eventually("the backlog to be stored", Duration::from_secs(30), || accounted(published)).await;
    let filler = fs.as_ref().map(SmallFs::fill);

    // Readings keep coming: the agent drops by policy, counts it and keeps running.
    for round in 0.. {
        let m = agent.metrics().await;
        let dropped = m.get("tributary_agent_spool_dropped_readings_total").copied().unwrap_or(0.0);
        let full = m.get("tributary_agent_spool_disk_full_total").copied().unwrap_or(0.0);
        if dropped > 0.0 && (full > 0.0 || fs.is_none()) {
            break;
        }
        assert!(round < 40, "the spool never filled: dropped {dropped}, disk full {full}");
        publish(agent.mqtt_port, "late", &messages("late/level", 2000)).await;
        published += 2000;
        eventually("the readings to be stored or dropped", Duration::from_secs(30), || accounted(published)).await;
    }
    assert!(agent.process.is_running(), "{}", agent.process.log_tail(20));
    assert_eq!(agent.metric("tributary_agent_broker_dropped_total").await, 0.0);

    // The aggregator returns: the backlog drains although the disk is still full.
    aggregator.restart().await;
    let dropped = agent.metric("tributary_agent_spool_dropped_readings_total").await as u64;
    eventually("the backlog to drain", Duration::from_secs(60), || async {
        (agent.metric("tributary_agent_spool_readings").await == 0.0
            && aggregator.total_readings().await == published - dropped)
            .then_some(())
    })
    .await;

    // New readings flow, into the room the delivered ones left.
    publish(agent.mqtt_port, "after", &messages("after/level", 500)).await;
    published += 500;
    eventually("new readings to arrive", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == published - dropped).then_some(())
    })
    .await;
    assert_eq!(agent.metric("tributary_agent_spool_dropped_readings_total").await as u64, dropped);

    // Space returns: the limit goes back up.
    if let Some(filler) = filler {
        std::fs::remove_file(filler).unwrap();
        // The agent looks again at each commit, every few seconds at most: keep a reading coming.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            publish(agent.mqtt_port, "tick", &messages("tick/level", 1)).await;
            published += 1;
            if agent.metric("tributary_agent_spool_max_bytes").await == limit {
                break;
            }
            assert!(Instant::now() < deadline, "the spool limit did not recover:\n{}", agent.process.log_tail(10));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eventually("every reading accounted for", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == published - dropped).then_some(())
    })
    .await;
    assert!(limit > 0.0 && limit < FS_BYTES as f64, "the limit in effect: {limit}");
    let log = agent.process.log_text();
    assert!(log.contains("spool.max_bytes 1 GiB does not fit on"), "{log}");
    eprintln!(
        "full-disk test: published {published}, dropped {dropped}, commits refused for lack of space {}",
        agent.metric("tributary_agent_spool_disk_full_total").await
    );
    // Published = logged + counted drops, nothing doubled, and the aggregator recorded the holes.
    assert_eq!(aggregator.log_contents().1 as u64 + dropped, published);
    assert_eq!(aggregator.metric("tributary_ingest_gap_readings_total").await as u64, dropped);
    agent.process.terminate();
}
