//! Effects once across a SIGKILL: the counter example commits its count
//! together with each event's seq and host instance, reports that position
//! (`Sidecar::applied`), and the SDK skips what it already applied when the
//! replayed events arrive. 10,000 hits, one SIGKILL while events are
//! handled but not yet acked: exactly 10,000.

mod support;

use std::path::PathBuf;

use pim_plugin_bridge::testkit::FakeHost;
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use support::*;

fn counter_bin() -> PathBuf {
    example("counter-sidecar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_sees_each_hit_once_across_a_sigkill() {
    init_logging();
    let dir = temp_dir();
    let mut config = SidecarConfig::spawn(
        "counter",
        ["counter.hit", "counter.get"],
        dir.path().join("sock"),
        CommandSpec::new(counter_bin()),
    );
    config.stuck_timeout = None;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let file = dir.path().join("plugins/counter/count");
    let hits = 10_000;
    let killed_after = count_once_across_sigkill(&host, &file, hits).await;
    println!(
        "figure: effects once: {hits} hits, SIGKILL after seq {killed_after}, {} events sent again to the new process, count {hits}",
        host.plugin().stats().queue.replayed
    );
    assert!(logged(
        |l| l.contains("skipping the events the plugin applied already")
    ));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_learns_its_event_and_may_ask_for_a_bounded_retry() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "retrier"), dir.path())
        .await
        .unwrap();
    let src = node(4);
    host.inject_payload(src, "retrier.seq", "which").await;
    // Refused twice, then handled: the SDK hands it back, in order.
    host.inject_payload(src, "retrier.seq", "retry 2").await;
    // Refused more often than the SDK retries: logged, counted as handled.
    host.inject_payload(src, "retrier.seq", "retry 99").await;
    host.inject_payload(src, "retrier.seq", "after").await;
    let seen = host
        .ports()
        .wait_until(WAIT, |calls| {
            let seen = seen_by(calls, src, "retrier.seen");
            seen.iter().any(|(_, b)| b == "after").then_some(seen)
        })
        .await
        .unwrap();
    let bodies: Vec<&str> = seen.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    let instance = bodies[0]
        .strip_prefix("seq 1 of ")
        .unwrap_or_else(|| panic!("the handler did not learn its event: {bodies:?}"));
    assert!(
        instance.len() == 16 && instance.bytes().all(|b| b.is_ascii_hexdigit()),
        "{instance}"
    );
    assert_eq!(
        bodies[1..],
        ["retry 2", "after"],
        "the retried event in its place; the one that never succeeded skipped"
    );
    assert!(logged(|l| l.contains(
        "asked for a retry 5 times; the event counts as handled"
    ) && l.contains("seq=3")));
    assert_eq!(host.plugin().stats().restarts, 0);
    host.shutdown().await;
}
