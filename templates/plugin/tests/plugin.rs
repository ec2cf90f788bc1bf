//! The plugin's own binary, hosted by the test kit's fake daemon: a real
//! process on a real socket, with ports that record every call.

use std::time::Duration;

use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_sidecar::{anyhow, ControlFrame, NodeId};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_ping_is_answered_by_name_before_and_after_a_crash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = SidecarConfig::spawn(
        "echo",
        ["echo.ping", "echo.pong"],
        dir.path().join("sock"),
        CommandSpec::new(env!("CARGO_BIN_EXE_my-plugin")),
    );
    // A sidecar that cannot start (a wrong name, a crash) fails here, with
    // the reason and its last output, instead of as a timeout later.
    config.required = true;
    let host = FakeHost::start(config, dir.path()).await?;

    let alice = NodeId::from_bytes([1; 16]);
    host.ports().add_peer(alice, [7; 32], "alice");
    host.inject_payload(alice, "echo.ping", "hi").await;
    let pong = host
        .ports()
        .wait_for(WAIT, |c| matches!(c, PortCall::SendRouted { .. }))
        .await?;
    assert_eq!(
        pong,
        PortCall::SendRouted {
            dst: alice,
            frame: ControlFrame::PluginPayload {
                kind: "echo.pong".into(),
                body: "hello alice, you said: hi".into(),
            },
            attempted: true,
        }
    );

    // SIGKILL the process: the daemon side restarts it, and a ping sent
    // meanwhile is answered by the new process.
    let first = host.kill_sidecar().expect("the sidecar runs");
    host.inject_payload(alice, "echo.ping", "again").await;
    host.poll_until("a new process", WAIT, || {
        host.plugin().pid().is_some_and(|pid| pid != first)
    })
    .await?;
    host.ports()
        .wait_until(WAIT, |calls| {
            calls.iter().find(|c| {
                matches!(c, PortCall::SendRouted { frame: ControlFrame::PluginPayload { body, .. }, .. }
                    if body.as_ref() == b"hello alice, you said: again")
            }).cloned()
        })
        .await?;
    assert_eq!(host.plugin().stats().restarts, 1);
    host.shutdown().await;
    Ok(())
}
