//! A sidecar that never reads: `handle_payload` still returns at once, the
//! daemon's memory stays within the configured bound, and every drop is
//! counted. Its own test binary, so that no other test moves the RSS.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::testkit::FakeHost;
use support::*;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_never_reads_cannot_stall_or_bloat_the_daemon() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "sink");
    if let pim_plugin_bridge::Launch::Spawn(cmd) = &mut config.launch {
        cmd.env.push(("PROBE_MODE".into(), "stubborn".into()));
    }
    config.queue.max_events = 10_000;
    config.queue.max_bytes = 8 * 1024 * 1024;
    let limits = config.queue;
    config.stuck_timeout = None;
    config.shutdown_grace = Duration::from_millis(200);
    config.term_grace = Duration::from_millis(200);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let src = node(1);
    host.inject_payload(src, "sink.seq", "stall").await;
    eventually("the stall to be delivered", || {
        host.plugin().stats().queue.delivered >= 1
    })
    .await;

    let plugin = host.plugin().clone();
    let body = [7u8; 1000];
    let n: u64 = 1_000_000;
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut peak_rss = rss_before;
    for i in 0..n {
        let t = Instant::now();
        plugin
            .handle_payload(src, "sink.seq", Bytes::copy_from_slice(&body))
            .await;
        slowest = slowest.max(t.elapsed());
        if i % 50_000 == 0 {
            peak_rss = peak_rss.max(rss_bytes());
        }
    }
    let elapsed = started.elapsed();
    peak_rss = peak_rss.max(rss_bytes());
    let stats = plugin.stats();
    println!(
        "{n} handle_payload calls in {elapsed:?} (slowest {slowest:?}); depth {} bytes {} dropped {}; RSS {} -> peak {} KiB (bound {} KiB)",
        stats.queue.depth,
        stats.queue.bytes,
        stats.queue.dropped_overflow,
        rss_before / 1024,
        peak_rss / 1024,
        limits.max_bytes / 1024
    );
    assert_eq!(stats.queue.pushed, n + 1);
    assert_eq!(stats.queue.acked_seq, 0, "the sidecar never acks");
    assert!(stats.queue.bytes <= limits.max_bytes);
    assert!(stats.queue.depth <= limits.max_events);
    assert_eq!(
        stats.queue.dropped_overflow,
        n + 1 - stats.queue.depth as u64,
        "every payload that is not in the queue was counted as dropped"
    );
    let growth = peak_rss.saturating_sub(rss_before);
    assert!(
        growth <= limits.max_bytes + limits.max_bytes / 10 + 4 * 1024 * 1024,
        "daemon memory grew by {} KiB, more than the {} KiB bound + 10% (+4 MiB for the allocator)",
        growth / 1024,
        limits.max_bytes / 1024
    );
    assert!(logged(
        |l| l.contains("event queue full") && l.contains("sink")
    ));
    host.shutdown().await;
}
