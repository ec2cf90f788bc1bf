//! End to end: the daemon side (`SidecarPlugin`) spawns a real sidecar
//! process, delivers payloads to it over the socket, and serves its calls
//! to every port.

mod support;

use std::time::Duration;

use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::SidecarConfig;
use pim_protocol::ControlFrame;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_reach_the_sidecar_in_order() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_config(dir.path()), dir.path())
        .await
        .unwrap();
    let src = node(1);
    let n = 500;
    for i in 0..n {
        host.inject_payload(src, "probe.seq", i.to_string()).await;
    }
    let seen = host
        .ports()
        .wait_until(WAIT, |calls| {
            let seen = seen_by(calls, src, "probe.seen");
            (seen.len() >= n).then_some(seen)
        })
        .await
        .unwrap();
    let seen: Vec<String> = seen.into_iter().map(|(_, n)| n).collect();
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(
        seen, expected,
        "payloads were handled out of order or twice"
    );
    eventually("the sidecar to ack everything", || {
        host.plugin().stats().queue.acked_seq == n as u64
    })
    .await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_rpc_reaches_the_daemon_ports() {
    init_logging();
    let dir = temp_dir();
    let mut config = probe_config(dir.path());
    config.grants.signing_seed = true;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let (me, alice, nobody) = (node(1), node(2), node(3));
    host.ports().add_peer(me, [1; 32], "me");
    host.ports().add_peer(alice, [0xa1; 32], "alice");

    let present = command(&host, me, &format!("lookup {}", hex(alice.as_bytes()))).await;
    assert_eq!(
        present,
        format!("lookup x25519={} name=alice", hex(&[0xa1; 32]))
    );
    let absent = command(&host, me, &format!("lookup {}", hex(nobody.as_bytes()))).await;
    assert_eq!(absent, "lookup x25519=none name=none");

    assert_eq!(
        command(&host, me, &format!("direct {}", hex(alice.as_bytes()))).await,
        "direct ok"
    );
    let direct = host
        .ports()
        .wait_for(
            WAIT,
            |c| matches!(c, PortCall::SendDirect { peer, .. } if *peer == alice),
        )
        .await
        .unwrap();
    assert_eq!(
        direct,
        PortCall::SendDirect {
            peer: alice,
            frame: ControlFrame::PluginPayload {
                kind: "probe.out".into(),
                body: "direct".into()
            }
        }
    );

    let routed = command(&host, me, &format!("routed {}", hex(alice.as_bytes()))).await;
    assert_eq!(routed, "routed attempted=true");
    let unroutable = command(&host, me, &format!("routed {}", hex(nobody.as_bytes()))).await;
    assert_eq!(unroutable, "routed attempted=false");

    assert_eq!(
        command(&host, me, "seed").await,
        format!("seed {}", hex(&[0x5e; 32]))
    );
    assert!(host.ports().calls().contains(&PortCall::SigningSeed));

    assert_eq!(command(&host, me, "watch").await, "watching");
    let carol = node(4);
    host.ports().add_peer(carol, [0xc0; 32], "carol");
    host.ports().forget_peer(carol);
    let watched = host
        .ports()
        .wait_until(WAIT, |calls| {
            let r: Vec<String> = sent_direct(calls, me, "probe.reply")
                .into_iter()
                .filter(|r| r.starts_with("watched"))
                .collect();
            (r.len() >= 2).then_some(r)
        })
        .await
        .unwrap();
    assert_eq!(
        watched,
        [
            format!("watched seen {} carol", hex(carol.as_bytes())),
            format!("watched forgotten {}", hex(carol.as_bytes())),
        ]
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_seed_needs_the_grant() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_config(dir.path()), dir.path())
        .await
        .unwrap();
    assert_eq!(
        command(&host, node(1), "seed").await,
        "seed error Some(PermissionDenied)"
    );
    assert!(!host.ports().calls().contains(&PortCall::SigningSeed));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_forgotten_reaches_the_sidecar() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_config(dir.path()), dir.path())
        .await
        .unwrap();
    let gone = node(9);
    host.ports().add_peer(gone, [9; 32], "gone");
    host.forget_peer(gone).await;
    let call = host
        .ports()
        .wait_for(
            WAIT,
            |c| matches!(c, PortCall::SendDirect { peer, .. } if *peer == gone),
        )
        .await
        .unwrap();
    assert_eq!(
        call,
        PortCall::SendDirect {
            peer: gone,
            frame: ControlFrame::PluginPayload {
                kind: "probe.forgotten".into(),
                body: hex(gone.as_bytes()).into()
            }
        }
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_process_and_no_socket() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_config(dir.path()), dir.path())
        .await
        .unwrap();
    let pid = host.plugin().pid().expect("the sidecar runs");
    let socket = host.plugin().socket_path();
    assert!(socket.exists());
    assert!(process_exists(pid));
    let started = std::time::Instant::now();
    host.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a sidecar that acks Shutdown must not wait out the grace period"
    );
    assert!(!socket.exists(), "socket file left behind");
    assert!(!process_exists(pid), "sidecar process {pid} left behind");
    assert_eq!(host.plugin().pid(), None);
    // Idempotent.
    host.shutdown().await;
    host.plugin().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_the_wrong_name_gets_a_clear_error() {
    init_logging();
    let dir = temp_dir();
    let err = start_error(
        dir.path(),
        "greeter",
        &["echo.ping", "echo.pong"],
        echo_bin(),
    )
    .await;
    assert!(
        err.contains("plugin name mismatch: the sidecar registered as `echo`, this socket is configured for `greeter`"),
        "unclear error: {err}"
    );
    assert!(
        err.contains("exit status 78"),
        "the refused sidecar must not be restarted: {err}"
    );
    assert!(!dir.path().join("sock/greeter.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_the_wrong_kinds_gets_a_clear_error() {
    init_logging();
    let dir = temp_dir();
    let err = start_error(dir.path(), "echo", &["echo.ping", "echo.other"], echo_bin()).await;
    assert!(
        err.contains(r#"payload kinds mismatch for plugin `echo`: configured but not registered ["echo.other"]; registered but not configured ["echo.pong"]"#),
        "unclear error: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_does_not_start_gets_a_clear_error() {
    init_logging();
    let dir = temp_dir();
    let err = start_error(
        dir.path(),
        "echo",
        &["echo.ping"],
        dir.path().join("no-such-binary"),
    )
    .await;
    assert!(
        err.contains("spawning sidecar `echo`") && err.contains("no-such-binary"),
        "unclear error: {err}"
    );
    assert!(!dir.path().join("sock/echo.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_checks_the_protocol_version() {
    use pim_sidecar::proto::pb;
    use pim_sidecar::proto::pb::plugin_session_client::PluginSessionClient;
    init_logging();
    let dir = temp_dir();
    let config = SidecarConfig::external("probe", ["probe.cmd"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let channel = pim_sidecar::connect_channel(&host.plugin().socket_path())
        .await
        .unwrap();
    let mut client = PluginSessionClient::new(channel);
    let mut req = tonic::Request::new(pb::RegisterRequest {
        protocol_version: 2,
        plugin_name: "probe".into(),
        payload_kinds: vec!["probe.cmd".into()],
        sdk_name: "test".into(),
        sdk_version: "0".into(),
        takeover: false,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", host.plugin().token()).parse().unwrap(),
    );
    let status = client.register(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "protocol version mismatch: the sidecar speaks 2, this host speaks 1"
    );
    host.shutdown().await;
}

/// Lists the services through one reflection version, as a client of it.
macro_rules! list_services {
    ($version:ident, $channel:expr, $token:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut req = tonic::Request::new(tokio_stream::iter([request]));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", $token).parse().unwrap(),
        );
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(req)
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_is_served_in_v1_and_v1alpha() {
    init_logging();
    let dir = temp_dir();
    let config = SidecarConfig::external("refl", ["refl.cmd"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let channel = pim_sidecar::connect_channel(&host.plugin().socket_path())
        .await
        .unwrap();
    let token = host.plugin().token().to_owned();
    let v1 = list_services!(v1, channel.clone(), token);
    let v1alpha = list_services!(v1alpha, channel, token);
    for services in [&v1, &v1alpha] {
        for name in pim_sidecar::proto::SERVICE_NAMES {
            assert!(
                services.iter().any(|s| s == name),
                "{name} not listed: {services:?}"
            );
        }
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "{services:?}"
        );
    }
    host.shutdown().await;
}
