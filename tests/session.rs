//! One live client per plugin, without a war: a second client waits, a
//! takeover stops the first, which does not register again, and everything
//! settles in bounded time with one takeover.

mod support;

use std::time::{Duration, Instant};

use pim_plugin_bridge::testkit::FakeHost;
use pim_plugin_bridge::SidecarConfig;
use support::*;

/// A probe sidecar started by hand against `dir`'s plugin `war`.
fn client(dir: &std::path::Path, label: &str, takeover: bool) -> ChildProcess {
    let mut cmd = tokio::process::Command::new(probe_bin());
    cmd.env_clear()
        .env("PIM_PLUGIN_SOCKET", dir.join("sock/war.sock"))
        .env("PIM_PLUGIN_TOKEN_FILE", dir.join("sock/war.token"))
        .env("PIM_PLUGIN_NAME", "war")
        .env("RUST_LOG", "info");
    if takeover {
        cmd.env("PIM_PLUGIN_TAKEOVER", "1");
    }
    ChildProcess::spawn(label, cmd)
}

fn registrations() -> usize {
    logged_lines(|l| l.contains("sidecar registered") && l.contains("plugin=\"war\"")).len()
}

/// Sends one payload and returns the pid of the client that handled it.
async fn holder(host: &FakeHost, body: &str) -> u32 {
    let src = node(7);
    host.inject_payload(src, "war.seq", body.to_owned()).await;
    let seen = host
        .ports()
        .wait_until(WAIT, |calls| {
            seen_by(calls, src, "war.seen")
                .into_iter()
                .find(|(_, b)| b == body)
        })
        .await
        .unwrap();
    seen.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_waits_and_a_takeover_stops_the_first_without_a_war() {
    init_logging();
    let dir = temp_dir();
    let config = SidecarConfig::external("war", ["war.cmd", "war.seq"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();

    let mut first = client(dir.path(), "first", false);
    eventually("the first client", || host.plugin().stats().connected).await;
    let second = client(dir.path(), "second", false);
    eventually("the second client to wait", || {
        second
            .lines()
            .iter()
            .any(|l| l.contains("another client holds this plugin's session; waiting"))
    })
    .await;
    assert_eq!(holder(&host, "1").await, first.pid());
    assert_eq!(registrations(), 1, "the waiting client registered");

    let taking = Instant::now();
    let third = client(dir.path(), "third", true);
    let status = tokio::time::timeout(WAIT, first.wait())
        .await
        .expect("the superseded client stops");
    let stopped = taking.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        first
            .lines()
            .iter()
            .any(|l| l.contains("another client took this plugin's session over: stopping")),
        "{:?}",
        first.lines()
    );
    assert_eq!(holder(&host, "2").await, third.pid());
    assert_eq!(registrations(), 2, "the superseded client registered again");

    // The taker goes away: the waiting client gets the session.
    let gone = Instant::now();
    third.signal(libc::SIGKILL);
    eventually("the waiting client to take its turn", || {
        registrations() == 3
    })
    .await;
    let settled = gone.elapsed();
    assert_eq!(holder(&host, "3").await, second.pid());
    assert_eq!(
        logged_lines(|l| l.contains("took the live session over") && l.contains("war")).len(),
        1,
        "exactly one takeover"
    );
    // Nothing more happens: no client registers again.
    host.inject_payload(node(7), "war.seq", "4".to_owned())
        .await;
    eventually("the last payload acked", || {
        host.plugin().stats().queue.acked_seq >= 4
    })
    .await;
    assert_eq!(registrations(), 3);
    // A client still waiting for the session stops at once on SIGTERM.
    let mut fourth = client(dir.path(), "fourth", false);
    eventually("the fourth client to wait", || {
        fourth
            .lines()
            .iter()
            .any(|l| l.contains("another client holds this plugin's session; waiting"))
    })
    .await;
    fourth.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, fourth.wait())
        .await
        .expect("a waiting client stops on SIGTERM");
    assert!(status.success(), "{status:?}: {:?}", fourth.lines());
    assert!(
        fourth
            .lines()
            .iter()
            .any(|l| l.contains("SIGTERM before registering: exiting")),
        "{:?}",
        fourth.lines()
    );
    assert_eq!(registrations(), 3);
    println!(
        "figure: takeover: the first client stopped {} ms after the taker started; the waiting client registered {} ms after the taker died; 3 registrations, 1 takeover",
        stopped.as_millis(),
        settled.as_millis()
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_session_id_is_named_as_such() {
    init_logging();
    let dir = temp_dir();
    let config =
        SidecarConfig::external("stale", ["stale.cmd", "stale.seq"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let client =
        pim_sidecar::HostSession::connect(&host.plugin().socket_path(), host.plugin().token())
            .await
            .unwrap();
    let bad = pim_sidecar::HostSession::connect(&host.plugin().socket_path(), "ab\ncd")
        .await
        .expect_err("a token with a newline");
    assert!(
        matches!(bad, pim_sidecar::HostError::InvalidToken(_))
            && bad.to_string().contains("not printable ASCII at offset 2"),
        "{bad}"
    );
    let err = client.ack(1).await.expect_err("no session");
    assert!(
        err.to_string()
            .contains("no session: call PluginSession/Register first"),
        "{err}"
    );
    client
        .register("stale", &["stale.cmd", "stale.seq"], "test", false)
        .await
        .unwrap();
    let id = client.session_id().to_string();
    // Its client never opens a stream: for 10 s a second Register is
    // refused (ALREADY_EXISTS), then accepted without a takeover, and the
    // old id is stale, not "superseded".
    let other =
        pim_sidecar::HostSession::connect(&host.plugin().socket_path(), host.plugin().token())
            .await
            .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut refused = 0;
    loop {
        match other
            .register("stale", &["stale.cmd", "stale.seq"], "test", false)
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused > 0, "a second client was accepted at once");
    assert_ne!(other.session_id().to_string(), id);
    let err = client.ack(0).await.expect_err("stale");
    assert!(err.to_string().contains("stale session"), "{err}");
    assert!(!err.to_string().contains("invalid field"), "{err}");
    host.shutdown().await;
}
