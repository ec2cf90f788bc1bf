//! Sidecars that survive: nothing lost across a SIGKILL, crash loops,
//! stuck sidecars, SIGTERM-ignoring sidecars, the daemon's own death, host
//! restarts under an external sidecar, and the sidecar's logs.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use pim_plugin_bridge::testkit::FakeHost;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_a_burst_loses_no_payload_and_keeps_order() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "burst");
    config.stuck_timeout = None;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let src = node(1);
    let n = 10_000;
    for i in 0..n {
        host.inject_payload(src, "burst.seq", i.to_string()).await;
    }
    let first = host.plugin().pid().unwrap();
    // Every call the probe makes here is one `.seen` reply; checks stay O(1)
    // because they run on every recorded call.
    host.ports()
        .wait_until(WAIT, |calls| (calls.len() >= 2_000).then_some(()))
        .await
        .unwrap();
    // SAFETY: kill has no memory-safety preconditions; `first` is our sidecar.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let last = (n - 1).to_string();
    host.ports()
        .wait_until(WAIT, |calls| {
            let tail = seen_by(&calls[calls.len().saturating_sub(1)..], src, "burst.seen");
            tail.iter()
                .any(|(pid, v)| *pid != first && *v == last)
                .then_some(())
        })
        .await
        .unwrap();
    let seen = seen_by(&host.ports().calls(), src, "burst.seen");

    let mut by_pid: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (pid, v) in &seen {
        by_pid.entry(*pid).or_default().push(v.parse().unwrap());
    }
    assert_eq!(
        by_pid.len(),
        2,
        "exactly one restart expected: {:?}",
        by_pid.keys()
    );
    for (pid, values) in &by_pid {
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "process {pid} handled payloads out of order"
        );
    }
    let mut handled: Vec<u64> = seen.iter().map(|(_, v)| v.parse().unwrap()).collect();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(handled, (0..n as u64).collect::<Vec<_>>(), "payloads lost");
    let duplicates = seen.len() - n;
    let stats = host.plugin().stats();
    println!(
        "SIGKILL after {} handled: {duplicates} duplicate deliveries, {} replayed, restarts {}",
        by_pid[&first].len(),
        stats.queue.replayed,
        stats.restarts
    );
    assert_eq!(stats.restarts, 1);
    assert!(stats.queue.replayed >= duplicates as u64);
    eventually("every payload acked", || {
        host.plugin().stats().queue.acked_seq == n as u64
    })
    .await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_then_marks_the_plugin_failed() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "crashy");
    if let pim_plugin_bridge::Launch::Spawn(cmd) = &mut config.launch {
        cmd.env.push(("PROBE_MODE".into(), "crash".into()));
    }
    config.wait_for_register = false;
    config.restart.max_restarts = 3;
    config.restart.window = Duration::from_secs(60);
    config.restart.initial_backoff = Duration::from_millis(20);
    config.restart.max_backoff = Duration::from_secs(1);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    eventually("the plugin to be marked failed", || {
        host.plugin().stats().failed
    })
    .await;
    let stats = host.plugin().stats();
    assert_eq!(stats.restarts, 3);
    assert_eq!(stats.last_exit.as_deref(), Some("exit status 3"));
    assert_eq!(stats.restart_delays.len(), 3);
    assert!(
        stats.restart_delays.windows(2).all(|w| w[0] < w[1]),
        "the backoff must grow: {:?}",
        stats.restart_delays
    );
    assert!(logged(|l| l.contains("crash loop") && l.contains("crashy")));
    // The daemon side is unharmed: payloads are still taken and kept.
    for i in 0..100 {
        host.inject_payload(node(1), "crashy.seq", i.to_string())
            .await;
    }
    assert_eq!(host.plugin().stats().queue.depth, 100);
    let socket = host.plugin().socket_path();
    host.shutdown().await;
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_sidecar_is_detected_and_restarted() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "stucky");
    if let pim_plugin_bridge::Launch::Spawn(cmd) = &mut config.launch {
        cmd.env.push(("PROBE_MODE".into(), "stall-once".into()));
        cmd.env.push((
            "PROBE_MARKER".into(),
            dir.path().join("plugins/stucky/stalled").into(),
        ));
    }
    config.stuck_timeout = Some(Duration::from_millis(500));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let src = node(1);
    host.inject_payload(src, "stucky.seq", "first").await;
    eventually("the first payload acked", || {
        host.plugin().stats().queue.acked_seq == 1
    })
    .await;
    let stalled = std::time::Instant::now();
    host.inject_payload(src, "stucky.seq", "stall").await;
    host.inject_payload(src, "stucky.seq", "after").await;
    eventually("the stuck sidecar to be found", || {
        host.plugin().stats().stuck_restarts == 1
    })
    .await;
    println!(
        "figure: stuck sidecar found {} ms after its stall (stuck_timeout 500 ms)",
        stalled.elapsed().as_millis()
    );
    let seen = host
        .ports()
        .wait_until(WAIT, |calls| {
            let seen = seen_by(calls, src, "stucky.seen");
            seen.iter().any(|(_, v)| v == "after").then_some(seen)
        })
        .await
        .unwrap();
    let stats = host.plugin().stats();
    assert_eq!(stats.stuck_restarts, 1);
    assert_eq!(stats.last_stuck_seq, Some(2));
    assert!(
        seen.iter().any(|(_, v)| v == "stall"),
        "the stalled payload is redelivered"
    );
    assert!(logged(
        |l| l.contains("no ack progress on seq 2") && l.contains("stucky")
    ));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_ignoring_sigterm_is_killed_after_the_grace_period() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "stubborn");
    if let pim_plugin_bridge::Launch::Spawn(cmd) = &mut config.launch {
        cmd.env.push(("PROBE_MODE".into(), "stubborn".into()));
    }
    config.shutdown_grace = Duration::from_millis(300);
    config.term_grace = Duration::from_millis(300);
    config.stuck_timeout = None;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    host.inject_payload(node(1), "stubborn.seq", "stall").await;
    eventually("the stall to be delivered", || {
        host.plugin().stats().queue.delivered >= 1
    })
    .await;
    let pid = host.plugin().pid().unwrap();
    let socket = host.plugin().socket_path();
    host.shutdown().await;
    assert!(!process_exists(pid), "the stubborn sidecar survived");
    assert!(!socket.exists(), "socket left behind");
    assert_eq!(
        host.plugin().stats().last_exit.as_deref(),
        Some("killed by signal 9")
    );
    assert!(logged(|l| l.contains("SIGTERM") && l.contains("stubborn")));
    assert!(logged(
        |l| l.contains("sidecar ignored SIGTERM: SIGKILL") && l.contains("stubborn")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_sidecar_dies_with_its_daemon_even_on_sigkill() {
    init_logging();
    let dir = temp_dir();
    let mut cmd = tokio::process::Command::new(test_host_bin());
    cmd.arg("--dir")
        .arg(dir.path())
        .args(["--name", "orphan", "--spawn"])
        .arg(probe_bin());
    let mut daemon = ChildProcess::spawn("test-host", cmd);
    let ready = daemon.wait_line("ready", |l| l.starts_with("ready ")).await;
    let sidecar: u32 = ready["ready ".len()..].parse().unwrap();
    assert!(process_exists(sidecar));
    daemon.kill().await;
    eventually("the sidecar to die with its daemon", || {
        !process_exists(sidecar)
    })
    .await;
}

/// A test-host whose probe sidecar runs in `mode`, with the given graces.
fn test_host(
    dir: &std::path::Path,
    name: &str,
    mode: &str,
    grace_ms: u64,
    term_ms: u64,
) -> ChildProcess {
    let mut cmd = tokio::process::Command::new(test_host_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--name", name, "--spawn"])
        .arg(probe_bin())
        .args(["--mode", mode])
        .args([
            "--grace",
            &grace_ms.to_string(),
            "--term",
            &term_ms.to_string(),
        ]);
    ChildProcess::spawn("test-host", cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_only_cancels_and_exits_still_gives_its_sidecar_the_grace() {
    init_logging();
    let dir = temp_dir();
    // pim-daemon 0.1.18 on SIGTERM: cancel, exit ~100 ms later, no shutdown().
    let mut daemon = test_host(dir.path(), "tidy", "slow-shutdown", 5000, 1000);
    let ready = daemon.wait_line("ready", |l| l.starts_with("ready ")).await;
    let sidecar: u32 = ready["ready ".len()..].parse().unwrap();
    daemon.send("cancel-exit").await;
    assert!(daemon.wait().await.success());
    // The sidecar got the Shutdown event and finishes its 1.5 s clean-up
    // although its daemon is gone.
    let marker = dir.path().join("plugins/tidy/marker");
    eventually("the sidecar's clean-up to finish", || marker.exists()).await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "clean-up finished"
    );
    eventually("the sidecar to exit", || !process_exists(sidecar)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_ignoring_sigterm_dies_within_both_graces_of_a_sigkilled_daemon() {
    init_logging();
    let dir = temp_dir();
    let (grace, term) = (Duration::from_millis(800), Duration::from_millis(800));
    let mut daemon = test_host(
        dir.path(),
        "stubborn",
        "stubborn",
        grace.as_millis() as u64,
        term.as_millis() as u64,
    );
    let ready = daemon.wait_line("ready", |l| l.starts_with("ready ")).await;
    let sidecar: u32 = ready["ready ".len()..].parse().unwrap();
    let started = std::time::Instant::now();
    daemon.kill().await;
    eventually("the stubborn sidecar to be killed", || {
        !process_exists(sidecar)
    })
    .await;
    let took = started.elapsed();
    println!("figure: a SIGTERM-ignoring sidecar outlived its SIGKILLed daemon by {} ms (shutdown_grace + term_grace = {} ms)", took.as_millis(), (grace + term).as_millis());
    // It is given the whole kill order, and not much more (the SDK itself
    // would only give up on the host after 5 s).
    assert!(
        took >= grace + term,
        "killed after {took:?}, before both graces"
    );
    assert!(
        took < grace + term + Duration::from_secs(2),
        "killed only after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_sidecar_reconnects_when_the_host_restarts() {
    init_logging();
    let dir = temp_dir();
    let host_cmd = || {
        let mut cmd = tokio::process::Command::new(test_host_bin());
        cmd.arg("--dir")
            .arg(dir.path())
            .args(["--name", "roamer", "--external"]);
        cmd
    };
    let mut host1 = ChildProcess::spawn("test-host 1", host_cmd());
    host1.wait_line("ready", |l| l.starts_with("ready")).await;
    let mut probe_cmd = tokio::process::Command::new(probe_bin());
    probe_cmd
        .env_clear()
        .env("PIM_PLUGIN_SOCKET", dir.path().join("sock/roamer.sock"))
        .env(
            "PIM_PLUGIN_TOKEN_FILE",
            dir.path().join("sock/roamer.token"),
        )
        .env("PIM_PLUGIN_NAME", "roamer");
    let probe = ChildProcess::spawn("external probe", probe_cmd);
    host1.send("payload roamer.seq before").await;
    let line = host1
        .wait_line("the first reply", |l| l.ends_with(" before"))
        .await;
    assert_eq!(line, format!("sent roamer.seen {} before", probe.pid()));

    host1.kill().await;
    let mut host2 = ChildProcess::spawn("test-host 2", host_cmd());
    host2.wait_line("ready", |l| l.starts_with("ready")).await;
    host2.send("payload roamer.seq after").await;
    let line = host2
        .wait_line("a reply after the restart", |l| l.ends_with(" after"))
        .await;
    assert_eq!(
        line,
        format!("sent roamer.seen {} after", probe.pid()),
        "the same sidecar process resumes with the new host"
    );
    host2.send("shutdown").await;
    host2.wait_line("stopped", |l| l == "stopped").await;
    let mut probe = probe;
    assert!(
        probe.wait().await.success(),
        "the sidecar exits 0 on Shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_log_lines_reach_the_host_log_with_the_plugin_name() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "chatty"), dir.path())
        .await
        .unwrap();
    eventually("the sidecar's JSON line in the host log at WARN", || {
        logged(|l| {
            l.contains(" WARN ")
                && l.contains("probe chatty says hello in JSON")
                && l.contains("plugin=\"chatty\"")
        })
    })
    .await;
    eventually("the sidecar's plain INFO line in the host log", || {
        logged(|l| {
            l.contains(" INFO ")
                && l.contains("registered")
                && l.contains("plugin=\"chatty\"")
                && l.contains("stream=\"stderr\"")
        })
    })
    .await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_sidecar_that_is_not_connected_yet() {
    init_logging();
    let dir = temp_dir();
    let config = pim_plugin_bridge::SidecarConfig::external(
        "late",
        ["late.cmd", "late.seq"],
        dir.path().join("sock"),
    );
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let src = node(1);
    for i in 0..50 {
        host.inject_payload(src, "late.seq", i.to_string()).await;
    }
    assert_eq!(host.plugin().stats().queue.depth, 50);
    assert!(!host.plugin().stats().connected);
    let mut cmd = tokio::process::Command::new(probe_bin());
    cmd.env_clear()
        .env("PIM_PLUGIN_SOCKET", host.plugin().socket_path())
        .env("PIM_PLUGIN_TOKEN_FILE", dir.path().join("sock/late.token"))
        .env("PIM_PLUGIN_NAME", "late");
    let _probe = ChildProcess::spawn("late probe", cmd);
    let seen = host
        .ports()
        .wait_until(WAIT, |calls| {
            (calls.len() >= 50).then(|| seen_by(calls, src, "late.seen"))
        })
        .await
        .unwrap();
    let values: Vec<String> = seen.into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, (0..50).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(host.plugin().stats().connected);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_sidecar_gets_a_clean_environment_without_the_token() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "clean"), dir.path())
        .await
        .unwrap();
    // This test process has PATH, HOME, CARGO_* and more; none may reach the sidecar.
    assert!(std::env::var_os("PATH").is_some());
    let env = command(&host, node(1), "env").await;
    assert_eq!(
        env, "env PIM_PLUGIN_NAME,PIM_PLUGIN_PROTOCOL_VERSION,PIM_PLUGIN_SOCKET,RUST_LOG",
        "only the PIM_PLUGIN_* variables and the configured ones; the SDK removes PIM_PLUGIN_TOKEN"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_cancel_token_shuts_the_sidecar_down() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "cancelled"), dir.path())
        .await
        .unwrap();
    let pid = host.plugin().pid().unwrap();
    let socket = host.plugin().socket_path();
    host.cancel_daemon();
    eventually("the sidecar to exit", || !process_exists(pid)).await;
    eventually("the socket to be removed", || !socket.exists()).await;
    assert_eq!(
        host.plugin().stats().last_exit.as_deref(),
        Some("exit status 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_in_a_relative_directory_hands_its_sidecar_absolute_paths() {
    init_logging();
    let dir = temp_dir();
    let mut cmd = tokio::process::Command::new(test_host_bin());
    cmd.current_dir(dir.path())
        .args(["--dir", ".", "--name", "rel", "--spawn"])
        .arg(probe_bin());
    let mut daemon = ChildProcess::spawn("test-host", cmd);
    daemon.wait_line("ready", |l| l.starts_with("ready ")).await;
    let root = dir.path().canonicalize().unwrap();
    daemon.send("payload rel.cmd socket").await;
    let socket = daemon
        .wait_line("the socket path", |l| {
            l.starts_with("sent rel.reply socket ")
        })
        .await;
    assert_eq!(
        socket,
        format!(
            "sent rel.reply socket {}",
            root.join("sock/rel.sock").display()
        )
    );
    daemon.send("payload rel.cmd datadir").await;
    let data = daemon
        .wait_line("the data dir", |l| l.starts_with("sent rel.reply datadir "))
        .await;
    assert_eq!(
        data,
        format!(
            "sent rel.reply datadir {}",
            root.join("plugins/rel").display()
        )
    );
    daemon.send("shutdown").await;
    daemon.wait_line("stopped", |l| l == "stopped").await;
}
