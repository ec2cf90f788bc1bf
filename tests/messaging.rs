//! `pim_messaging::MessagingPlugin`, unchanged, out of process on two
//! simulated nodes: alice's sidecar sends an end-to-end encrypted message to
//! bob (real ECIES, keys derived from each node's seed); bob's sidecar
//! stores it in its `messages.db` and acks; alice marks it delivered.

mod support;

use std::path::Path;
use std::sync::Arc;

use pim_messaging::hex_node_id;
use pim_plugin_bridge::{CommandSpec, SidecarConfig, SidecarPlugin};
use pim_sidecar_examples::mesh::Mesh;
use support::*;

/// The messaging plugin's own directory below a node's data directory.
fn plugin_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("plugins/messaging")
}

/// One command to a node's messaging sidecar.
async fn messaging(data_dir: &Path, command: &str) -> String {
    control(&plugin_dir(data_dir).join("messaging.ctl"), command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_messaging_plugin_delivers_an_encrypted_message_between_sidecars() {
    init_logging();
    let dir = temp_dir();
    let mesh = Mesh::new();
    let mut nodes = Vec::new();
    for (i, name) in ["alice", "bob"].into_iter().enumerate() {
        let data = dir.path().join(name).join("data");
        std::fs::create_dir_all(&data).unwrap();
        let node = mesh.add_node(name, [i as u8 + 7; 32], data);
        let mut config = SidecarConfig::spawn(
            "messaging",
            [pim_messaging::KIND_MESSAGE, pim_messaging::KIND_ACK],
            dir.path().join(name).join("sock"),
            CommandSpec::new(example("messaging-sidecar")).env("RUST_LOG", "info"),
        );
        config.grants.signing_seed = true;
        let plugin = Arc::new(SidecarPlugin::new(config).unwrap());
        mesh.start_plugin(&node, plugin).await.unwrap();
        nodes.push(node);
    }
    let (alice, bob) = (&nodes[0], &nodes[1]);

    let sent = messaging(
        alice.data_dir(),
        &format!("send {} hello bob, this is alice", hex_node_id(&bob.id)),
    )
    .await;
    let id = sent
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("send failed: {sent}"))
        .to_owned();

    let mut received = String::new();
    for _ in 0..200 {
        received = messaging(
            bob.data_dir(),
            &format!("history {}", hex_node_id(&alice.id)),
        )
        .await;
        if received.contains(&id) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        received.contains(&format!("{id} received delivered hello bob, this is alice")),
        "bob's sidecar did not decrypt and store the message:\n{received}"
    );
    assert!(plugin_dir(bob.data_dir()).join("messages.db").exists());
    assert!(!bob.data_dir().join("messages.db").exists());

    let mut status = String::new();
    for _ in 0..200 {
        status = messaging(
            alice.data_dir(),
            &format!("history {}", hex_node_id(&bob.id)),
        )
        .await;
        if status.contains(&format!("{id} sent delivered")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        status.contains(&format!("{id} sent delivered hello bob, this is alice")),
        "alice did not mark the message delivered:\n{status}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_needs_the_seed_says_what_to_grant() {
    init_logging();
    let dir = temp_dir();
    let config = SidecarConfig::spawn(
        "messaging",
        [pim_messaging::KIND_MESSAGE, pim_messaging::KIND_ACK],
        dir.path().join("sock"),
        CommandSpec::new(example("messaging-sidecar")),
    );
    let host = pim_plugin_bridge::testkit::FakeHost::start(config, dir.path())
        .await
        .unwrap();
    eventually("the plugin to be marked failed without restarts", || {
        host.plugin().stats().failed
    })
    .await;
    assert_eq!(host.plugin().stats().restarts, 0);
    assert_eq!(
        host.plugin().stats().last_exit.as_deref(),
        Some("exit status 78")
    );
    assert!(logged(|l| l.contains(
        "did not grant SIGNING_SEED: add grants = [\"signing_seed\"]"
    )));
    host.shutdown().await;
}
