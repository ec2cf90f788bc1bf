//! What a daemon meets when a sidecar starts, fails, is replaced and stops:
//! the failure policy (`required`), a failed plugin's retry, one claimant
//! per kind, `restart()`, each plugin's own data directory, and the SDK's
//! logging. (The supervisor's stop without a false restart is a unit test
//! in `bridge/src/supervisor.rs`.)

mod support;

use std::sync::Arc;
use std::time::Duration;

use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::testkit::{FakeHost, RecordingPorts};
use pim_plugin_bridge::{DataDir, Launch, SidecarConfig, SidecarPlugin};
use support::*;
use tokio_util::sync::CancellationToken;

fn missing_binary(dir: &std::path::Path, name: &str) -> SidecarConfig {
    let mut config = probe_named(dir, name);
    if let Launch::Spawn(cmd) = &mut config.launch {
        cmd.program = dir.join("no-such-sidecar");
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_plugin_that_cannot_start_is_failed_and_the_daemon_runs_on() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(missing_binary(dir.path(), "ghost"), dir.path())
        .await
        .expect("an optional plugin's failure does not fail start()");
    let stats = host.plugin().stats();
    assert!(stats.failed && !stats.required, "{stats:?}");
    let failure = stats.failure.unwrap();
    assert!(
        failure.contains("no-such-sidecar") && failure.contains("not found (no file"),
        "{failure}"
    );
    assert!(logged(
        |l| l.contains("plugin marked failed") && l.contains("ghost")
    ));
    // The daemon side still takes payloads and keeps them for a later start.
    host.inject_payload(node(1), "ghost.seq", "kept").await;
    assert_eq!(host.plugin().stats().queue.depth, 1);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_plugin_that_cannot_start_fails_start_with_the_reason() {
    init_logging();
    let dir = temp_dir();
    let mut config = missing_binary(dir.path(), "needed");
    config.required = true;
    let err = FakeHost::start(config, dir.path())
        .await
        .expect_err("a required plugin's failure fails start()")
        .to_string();
    assert!(
        err.contains("sidecar `needed` failed to start") && err.contains("no-such-sidecar"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_plugin_in_a_crash_loop_lets_start_return() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "crashy");
    if let Launch::Spawn(cmd) = &mut config.launch {
        cmd.env.push(("PROBE_MODE".into(), "crash".into()));
    }
    config.restart.max_restarts = 1;
    config.restart.initial_backoff = Duration::from_millis(10);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let stats = host.plugin().stats();
    assert!(stats.failed, "{stats:?}");
    assert!(stats.failure.unwrap().contains("crash loop"));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_plugin_is_retried_later_and_comes_up_once_it_can() {
    init_logging();
    let dir = temp_dir();
    let mut config = missing_binary(dir.path(), "late");
    config.restart.retry_failed_after = Some(Duration::from_millis(300));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let stats = host.plugin().stats();
    assert!(stats.failed);
    let next = stats
        .next_attempt_in
        .expect("stats() tells when it is retried");
    assert!(next <= Duration::from_millis(300), "{next:?}");
    host.inject_payload(node(1), "late.seq", "waited").await;
    // The binary is installed after the daemon started.
    std::os::unix::fs::symlink(probe_bin(), dir.path().join("no-such-sidecar")).unwrap();
    eventually("the retried plugin to handle the waiting payload", || {
        !seen_by(&host.ports().calls(), node(1), "late.seen").is_empty()
    })
    .await;
    let stats = host.plugin().stats();
    assert!(
        !stats.failed && stats.failure.is_none() && stats.next_attempt_in.is_none(),
        "{stats:?}"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecar_plugins_of_one_daemon_cannot_claim_one_kind() {
    init_logging();
    let dir = temp_dir();
    let ports = RecordingPorts::new([3; 32]);
    let cancel = CancellationToken::new();
    let ctx = ports.context(dir.path(), cancel.clone());
    let first = Arc::new(
        SidecarPlugin::new(SidecarConfig::external(
            "alpha",
            ["shared.kind", "alpha.x"],
            dir.path().join("sock"),
        ))
        .unwrap(),
    );
    let second = Arc::new(
        SidecarPlugin::new(SidecarConfig::external(
            "beta",
            ["beta.y", "shared.kind"],
            dir.path().join("sock"),
        ))
        .unwrap(),
    );
    first.clone().start(ctx.clone()).await.unwrap();
    let err = second
        .clone()
        .start(ctx.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`shared.kind`") && err.contains("`alpha`") && err.contains("`beta`"),
        "{err}"
    );
    // Another daemon in the same process (its own ports) is not affected.
    let other = Arc::new(
        SidecarPlugin::new(SidecarConfig::external(
            "beta",
            ["beta.y", "shared.kind"],
            dir.path().join("other"),
        ))
        .unwrap(),
    );
    other
        .clone()
        .start(RecordingPorts::new([4; 32]).context(dir.path(), cancel.clone()))
        .await
        .unwrap();
    other.shutdown().await;
    // Once the first stops, its kinds are free.
    first.shutdown().await;
    second.clone().start(ctx).await.unwrap();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replaces_the_process_and_loses_no_event() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "upgraded"), dir.path())
        .await
        .unwrap();
    let old_pid = host.plugin().pid().unwrap();
    for i in 0..150 {
        host.inject_payload(node(1), "upgraded.seq", format!("e{i}"))
            .await;
    }
    eventually("the first process to handle the first half", || {
        host.plugin().stats().queue.acked_seq == 150
    })
    .await;
    // The replacement lands while the second half is being delivered.
    for i in 150..300 {
        host.inject_payload(node(1), "upgraded.seq", format!("e{i}"))
            .await;
        if i == 160 {
            host.plugin().restart().await.unwrap();
        }
    }
    let new_pid = host.plugin().pid().unwrap();
    assert_ne!(old_pid, new_pid);
    eventually("every event handled", || {
        host.plugin().stats().queue.acked_seq == 300
    })
    .await;
    let seen = seen_by(&host.ports().calls(), node(1), "upgraded.seen");
    for i in 0..300 {
        assert!(
            seen.iter().any(|(_, b)| *b == format!("e{i}")),
            "e{i} was lost"
        );
    }
    assert!(seen.iter().any(|(pid, _)| *pid == old_pid));
    assert!(seen.iter().any(|(pid, _)| *pid == new_pid));
    let stats = host.plugin().stats();
    assert_eq!((stats.replacements, stats.restarts), (1, 1), "{stats:?}");
    assert!(
        stats.restart_delays.is_empty(),
        "a replacement is not a crash: {stats:?}"
    );
    // Forwarded output lines name the plugin once (the span), not twice.
    let forwarded: Vec<String> =
        logged_lines(|l| l.contains("pim_sidecar::output") && l.contains("upgraded"));
    assert!(!forwarded.is_empty());
    for line in forwarded {
        assert_eq!(line.matches("plugin").count(), 1, "{line}");
    }
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plugin_gets_its_own_data_directory_unless_configured() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "keeper"), dir.path())
        .await
        .unwrap();
    let reply = command(&host, node(1), "datadir").await;
    let own = dir.path().join("plugins/keeper");
    assert_eq!(reply, format!("datadir {}", own.display()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&own).unwrap().permissions().mode() & 0o777,
        0o700
    );
    host.shutdown().await;

    let mut config = probe_named(dir.path(), "owner");
    config.data_dir = DataDir::Daemon;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let reply = command(&host, node(1), "datadir").await;
    assert_eq!(reply, format!("datadir {}", dir.path().display()));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_honours_a_full_rust_log_filter() {
    init_logging();
    let dir = temp_dir();
    let mut cmd = tokio::process::Command::new(probe_bin());
    cmd.env_clear()
        .env("PIM_PLUGIN_SOCKET", dir.path().join("nobody-serves.sock"))
        .env("PIM_PLUGIN_TOKEN", "t")
        .env("RUST_LOG", "warn,pim_sidecar=debug");
    let probe = ChildProcess::spawn("probe", cmd);
    // DEBUG from pim_sidecar passes the filter; INFO from elsewhere does not.
    eventually("a DEBUG line of pim_sidecar", || {
        probe
            .lines()
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("host not reachable yet"))
    })
    .await;
    assert!(
        !probe.lines().iter().any(|l| l.contains(" INFO ")),
        "{:?}",
        probe.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_kit_waits_on_anything_and_kills_the_sidecar() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "kitted"), dir.path())
        .await
        .unwrap();
    let first = host.kill_sidecar().expect("a sidecar runs");
    host.poll_until("the restart", WAIT, || {
        host.plugin().stats().restarts >= 1 && host.plugin().pid().is_some_and(|p| p != first)
    })
    .await
    .unwrap();
    // Its output is kept across the restart, both processes' lines, for
    // the kit to print when a test fails.
    host.poll_until("both processes' registered lines", WAIT, || {
        host.output()
            .iter()
            .filter(|l| l.starts_with("[stderr]") && l.contains("registered"))
            .count()
            >= 2
    })
    .await
    .unwrap();
    let err = host
        .poll_until(
            "something that never happens",
            Duration::from_millis(50),
            || false,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "timed out after 50ms waiting for something that never happens; plugin stats:"
        ),
        "{err}"
    );
    // Dropped without shutdown (a failed assertion, say), the kit's host
    // does not leave its sidecar running.
    let pid = host.plugin().pid().expect("a sidecar runs");
    drop(host);
    eventually("the dropped host's sidecar to end", || !process_exists(pid)).await;
}
