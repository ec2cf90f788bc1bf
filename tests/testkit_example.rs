//! How a plugin author tests a sidecar binary with the test kit: a fake
//! daemon (`FakeHost`) hosts the real process through `SidecarPlugin`,
//! records every port call, and lets the test inject payloads and peer
//! events and wait for the plugin's reactions. This is the example the
//! README shows; the binary under test could be written in any language.

use std::time::Duration;

use pim_core::NodeId;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_protocol::ControlFrame;

#[tokio::test(flavor = "multi_thread")]
async fn the_echo_sidecar_pongs_a_known_peer_by_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = SidecarConfig::spawn(
        "echo",
        ["echo.ping", "echo.pong"],
        dir.path().join("sock"),
        CommandSpec::new(env!("CARGO_BIN_EXE_echo-sidecar")),
    );
    let host = FakeHost::start(config, dir.path()).await?;

    let alice = NodeId::from_bytes([1; 16]);
    host.ports().add_peer(alice, [7; 32], "alice");
    host.inject_payload(alice, "echo.ping", "hi").await;

    let pong = host
        .ports()
        .wait_for(Duration::from_secs(10), |c| {
            matches!(c, PortCall::SendRouted { .. })
        })
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
    assert!(host
        .ports()
        .calls()
        .contains(&PortCall::LookupName { node: alice }));
    host.shutdown().await;
    Ok(())
}
