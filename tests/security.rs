//! Only the right process gets in, and bad input gets a clear error and
//! harms nothing: every rule over a real socket.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::SidecarConfig;
use pim_protocol::ControlFrame;
use pim_sidecar::proto::pb;
use pim_sidecar::proto::pb::control_sender_client::ControlSenderClient;
use pim_sidecar::proto::pb::identity_secrets_client::IdentitySecretsClient;
use pim_sidecar::proto::pb::peer_directory_client::PeerDirectoryClient;
use pim_sidecar::proto::pb::plugin_session_client::PluginSessionClient;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn channel(host: &FakeHost) -> Channel {
    pim_sidecar::connect_channel(&host.plugin().socket_path())
        .await
        .unwrap()
}

fn external(dir: &std::path::Path, name: &str) -> SidecarConfig {
    SidecarConfig::external(
        name,
        [format!("{name}.cmd"), format!("{name}.seq")],
        dir.join("sock"),
    )
}

async fn register(host: &FakeHost, ch: &Channel, name: &str) -> pb::RegisterResponse {
    PluginSessionClient::new(ch.clone())
        .register(authed(
            pb::RegisterRequest {
                protocol_version: 1,
                plugin_name: name.into(),
                payload_kinds: vec![format!("{name}.cmd"), format!("{name}.seq")],
                sdk_name: "test".into(),
                sdk_version: "0".into(),
                // Tests register again and again on one socket.
                takeover: true,
            },
            host.plugin().token(),
        ))
        .await
        .unwrap()
        .into_inner()
}

#[track_caller]
fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "`{}` lacks `{needle}`",
        status.message()
    );
}

/// Starts `config` as an optional plugin, which fails without failing
/// `start()`, then as a required one, which fails `start()`; returns the
/// required one's error, which the optional one's `stats().failure` holds.
async fn refused(mut config: SidecarConfig, dir: &std::path::Path) -> String {
    let host = FakeHost::start(config.clone(), dir)
        .await
        .expect("an optional plugin that cannot start does not fail start()");
    let stats = host.plugin().stats();
    assert!(stats.failed && !stats.connected, "{stats:?}");
    config.required = true;
    config.wait_for_register = true;
    let err = FakeHost::start(config, dir)
        .await
        .expect_err("a required plugin that cannot start fails start()")
        .to_string();
    let failure = stats.failure.unwrap();
    assert!(failure.contains(&err), "{failure} / {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_and_loose_directories_are_refused() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(external(dir.path(), "files"), dir.path())
        .await
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("sock")), 0o700);
    assert_eq!(mode(&host.plugin().socket_path()), 0o600);
    assert_eq!(mode(&dir.path().join("sock/files.token")), 0o600);
    host.shutdown().await;
    assert!(
        !dir.path().join("sock/files.token").exists(),
        "token file removed at shutdown"
    );

    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = SidecarConfig::external("loose", ["loose.cmd"], &loose);
    let err = refused(config, dir.path()).await;
    assert!(
        err.contains("has mode 755") && err.contains("chmod 700"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_of_another_owner_is_refused() {
    init_logging();
    if !root_or_skip("only root can give a directory to another owner") {
        return;
    }
    let dir = temp_dir();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let config = SidecarConfig::external("theirs", ["theirs.cmd"], &theirs);
    let err = refused(config, dir.path()).await;
    assert!(err.contains("owned by uid 65534"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_is_never_taken_over() {
    init_logging();
    let dir = temp_dir();
    let sock_dir = dir.path().join("sock");
    std::fs::create_dir(&sock_dir).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A socket file whose listener is gone: what a dead host leaves.
    drop(std::os::unix::net::UnixListener::bind(sock_dir.join("stale.sock")).unwrap());
    assert!(sock_dir.join("stale.sock").exists());
    let host = FakeHost::start(external(dir.path(), "stale"), dir.path())
        .await
        .unwrap();
    let ch = channel(&host).await;
    register(&host, &ch, "stale").await;

    let err = refused(external(dir.path(), "stale"), dir.path()).await;
    assert!(err.contains("another host is serving on"), "{err}");
    // The live host is untouched.
    register(&host, &ch, "stale").await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_are_unauthenticated_and_the_token_is_never_logged() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(external(dir.path(), "tokens"), dir.path())
        .await
        .unwrap();
    let ch = channel(&host).await;
    let req = || pb::RegisterRequest {
        protocol_version: 1,
        plugin_name: "tokens".into(),
        payload_kinds: vec!["tokens.cmd".into(), "tokens.seq".into()],
        ..Default::default()
    };
    let mut client = PluginSessionClient::new(ch.clone());
    assert_status(
        client.register(Request::new(req())).await,
        Code::Unauthenticated,
        "missing `authorization: Bearer <token>`",
    );
    let wrong = "f".repeat(64);
    assert_status(
        client.register(authed(req(), &wrong)).await,
        Code::Unauthenticated,
        "wrong token",
    );
    assert_status(
        client
            .register(authed(req(), &host.plugin().token()[..63]))
            .await,
        Code::Unauthenticated,
        "wrong token",
    );
    assert_eq!(host.plugin().token().len(), 64, "256 bits, hex");
    assert!(client
        .register(authed(req(), host.plugin().token()))
        .await
        .is_ok());
    let token = host.plugin().token().to_owned();
    assert!(logged(|l| l.contains("wrong token") && l.contains("tokens")));
    assert!(
        !logged(|l| l.contains(&token) || l.contains(&wrong)),
        "a token reached the log"
    );
    assert!(
        !format!("{:?}", host.plugin()).contains(&token),
        "Debug shows the token"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_a_uid_not_allowed_are_refused() {
    init_logging();
    let dir = temp_dir();
    let mut config = external(dir.path(), "uids");
    config.allowed_uids = vec![4242];
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let ch = channel(&host).await;
    let result = PluginSessionClient::new(ch)
        .register(authed(
            pb::RegisterRequest::default(),
            host.plugin().token(),
        ))
        .await;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    assert_status(
        result,
        Code::PermissionDenied,
        &format!("processes of uid {me} may not use this plugin socket (allowed uids: [4242])"),
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_running_as_nobody_is_refused() {
    init_logging();
    if !root_or_skip("dropping to nobody needs root") {
        return;
    }
    let Some(grpcurl) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let Some(setpriv) = tool("setpriv", "PIM_SETPRIV") else {
        return;
    };
    let dir = temp_dir();
    let host = FakeHost::start(external(dir.path(), "nobody"), dir.path())
        .await
        .unwrap();
    // grpcurl as uid 65534, keeping only the right to pass the 0700 directory,
    // so that the host's SO_PEERCRED check is what refuses it.
    let args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+dac_read_search,+dac_override",
        "--ambient-caps=+dac_read_search,+dac_override",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        grpcurl.display().to_string(),
        "-plaintext".into(),
        "-unix".into(),
        "-authority".into(),
        "localhost".into(),
        "-H".into(),
        format!("authorization: Bearer {}", host.plugin().token()),
        host.plugin().socket_path().display().to_string(),
        "list".into(),
    ])
    .collect();
    let (ok, out, err) = run_tool(&setpriv, &args).await;
    assert!(!ok, "nobody got in: {out}");
    assert!(
        err.contains("PermissionDenied") && err.contains("uid 65534"),
        "{err}"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_limit_what_a_plugin_may_do() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "caps"), dir.path())
        .await
        .unwrap();
    let me = node(1);
    assert_eq!(
        command(&host, me, "seed").await,
        "seed error Some(PermissionDenied)"
    );
    let goodbye = command(&host, me, "goodbye").await;
    assert!(
        goodbye.contains("PermissionDenied")
            && goodbye.contains("Goodbye frame needs the RAW_CONTROL capability"),
        "{goodbye}"
    );
    let foreign = command(&host, me, "send other.kind").await;
    assert!(
        foreign.contains("PermissionDenied")
            && foreign.contains("outside this plugin's namespace `caps.`"),
        "{foreign}"
    );
    let sneaky = command(&host, me, "send capsx.kind").await;
    assert!(
        sneaky.contains("PermissionDenied"),
        "a prefix without the dot is foreign: {sneaky}"
    );
    assert_eq!(command(&host, me, "send caps.anything").await, "send ok");
    let sent: Vec<_> = host
        .ports()
        .calls()
        .into_iter()
        .filter(|c| matches!(c, PortCall::SendDirect { frame, .. } if !matches!(frame, ControlFrame::PluginPayload { kind, .. } if kind == "caps.reply")))
        .collect();
    assert_eq!(
        sent.len(),
        1,
        "only the namespaced payload reached the port: {sent:?}"
    );
    assert!(!host.ports().calls().contains(&PortCall::SigningSeed));
    host.shutdown().await;

    let mut config = probe_named(dir.path(), "trusted");
    config.grants.signing_seed = true;
    config.grants.raw_control = true;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    assert_eq!(command(&host, me, "goodbye").await, "goodbye ok");
    assert_eq!(command(&host, me, "send other.kind").await, "send ok");
    assert!(command(&host, me, "seed").await.starts_with("seed 5e5e"));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_reports_the_grants() {
    init_logging();
    let dir = temp_dir();
    let mut config = external(dir.path(), "granted");
    config.grants.signing_seed = true;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let resp = register(&host, &channel(&host).await, "granted").await;
    assert_eq!(resp.granted, [pb::Capability::SigningSeed as i32]);
    let limits = resp.limits.unwrap();
    assert_eq!(
        (
            limits.max_body_bytes,
            limits.max_kind_bytes,
            limits.max_name_bytes
        ),
        (65535, 255, 255)
    );
    // The plugin's own directory below the daemon's, closed to others.
    let own = dir.path().join("plugins/granted");
    assert_eq!(resp.data_dir, own.display().to_string());
    assert_eq!(
        std::fs::metadata(&own).unwrap().permissions().mode() & 0o777,
        0o700
    );
    host.shutdown().await;
}

fn frame(f: pb::control_frame::Frame) -> Option<pb::ControlFrame> {
    Some(pb::ControlFrame { frame: Some(f) })
}

fn plugin_payload(kind: &str, body: usize) -> Option<pb::ControlFrame> {
    frame(pb::control_frame::Frame::PluginPayload(pb::PluginPayload {
        kind: kind.into(),
        body: Bytes::from(vec![0; body]),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_rpc_gets_a_clear_error_and_harms_nothing() {
    init_logging();
    let dir = temp_dir();
    // The real sidecar keeps working on its own plugin throughout.
    let real = FakeHost::start(probe_named(dir.path(), "real"), dir.path())
        .await
        .unwrap();
    let host = FakeHost::start(external(dir.path(), "bad"), dir.path())
        .await
        .unwrap();
    let token = host.plugin().token().to_owned();
    let ch = channel(&host).await;
    let mut session = PluginSessionClient::new(ch.clone());
    let mut peers = PeerDirectoryClient::new(ch.clone());
    let mut control = ControlSenderClient::new(ch.clone());
    let mut identity = IdentitySecretsClient::new(ch.clone());
    let t = token.as_str();

    // Before Register.
    assert_status(
        peers
            .lookup_name(authed(
                pb::LookupNameRequest {
                    session_id: "x".into(),
                    node: Bytes::from_static(&[0; 16]),
                },
                t,
            ))
            .await,
        Code::FailedPrecondition,
        "call PluginSession/Register first",
    );
    assert_status(
        session
            .events(authed(
                pb::EventsRequest {
                    session_id: "x".into(),
                },
                t,
            ))
            .await,
        Code::FailedPrecondition,
        "Register first",
    );
    // Register with bad fields.
    let reg = |name: &str, kinds: Vec<String>| {
        authed(
            pb::RegisterRequest {
                protocol_version: 1,
                plugin_name: name.into(),
                payload_kinds: kinds,
                ..Default::default()
            },
            t,
        )
    };
    assert_status(
        session.register(reg("", vec![])).await,
        Code::InvalidArgument,
        "invalid field `plugin_name`: a plugin name is 1..=64 bytes, got 0",
    );
    assert_status(
        session.register(reg("bad", vec!["k".repeat(256)])).await,
        Code::InvalidArgument,
        "invalid field `payload_kinds[0]`: a kind is 1..=255 bytes, got 256",
    );
    assert_status(
        session.register(reg("bad", vec!["bad.ü".into()])).await,
        Code::InvalidArgument,
        "non-ASCII byte at offset 4",
    );

    let first = register(&host, &ch, "bad").await.session_id;
    let id = register(&host, &ch, "bad").await.session_id;
    assert_ne!(first, id);
    assert_status(
        peers
            .lookup_name(authed(
                pb::LookupNameRequest {
                    session_id: first.clone(),
                    node: Bytes::from_static(&[0; 16]),
                },
                t,
            ))
            .await,
        Code::Aborted,
        "superseded: another client took this plugin's session over",
    );
    assert_status(
        peers
            .lookup_name(authed(
                pb::LookupNameRequest {
                    session_id: String::new(),
                    node: Bytes::from_static(&[0; 16]),
                },
                t,
            ))
            .await,
        Code::InvalidArgument,
        "`session_id`: is required",
    );

    let sid = || id.clone();
    let lookup = |node: &[u8]| {
        authed(
            pb::LookupX25519Request {
                session_id: sid(),
                node: Bytes::copy_from_slice(node),
            },
            t,
        )
    };
    assert_status(
        peers.lookup_x25519(lookup(&[1; 15])).await,
        Code::InvalidArgument,
        "invalid field `node`: a node id is exactly 16 bytes, got 15",
    );
    assert_status(
        peers.lookup_x25519(lookup(&[])).await,
        Code::InvalidArgument,
        "got 0",
    );

    let routed = |dst: &[u8], frame: Option<pb::ControlFrame>| {
        authed(
            pb::SendRoutedRequest {
                session_id: sid(),
                dst: Bytes::copy_from_slice(dst),
                frame,
            },
            t,
        )
    };
    let n = [2u8; 16];
    assert_status(
        control
            .send_routed(routed(&[2; 17], plugin_payload("bad.x", 1)))
            .await,
        Code::InvalidArgument,
        "`dst`: a node id is exactly 16 bytes, got 17",
    );
    assert_status(
        control.send_routed(routed(&n, None)).await,
        Code::InvalidArgument,
        "`frame`: is required but missing",
    );
    assert_status(
        control
            .send_routed(routed(&n, Some(pb::ControlFrame { frame: None })))
            .await,
        Code::InvalidArgument,
        "`frame.frame`: is required",
    );
    assert_status(
        control.send_routed(routed(&n, plugin_payload("", 1))).await,
        Code::InvalidArgument,
        "`frame.plugin_payload.kind`: a kind is 1..=255 bytes, got 0",
    );
    assert_status(
        control
            .send_routed(routed(&n, plugin_payload(&"b".repeat(300), 1)))
            .await,
        Code::InvalidArgument,
        "got 300",
    );
    assert_status(
        control
            .send_routed(routed(&n, plugin_payload("bad.\u{7f}é", 1)))
            .await,
        Code::InvalidArgument,
        "non-ASCII",
    );
    assert_status(
        control
            .send_routed(routed(&n, plugin_payload("bad.x", 65_536)))
            .await,
        Code::InvalidArgument,
        "`frame.plugin_payload.body`: a body is at most 65535 bytes, got 65536",
    );
    let info = |key: usize, name: String| {
        frame(pb::control_frame::Frame::PeerInfo(pb::PeerInfo {
            x25519: Bytes::from(vec![1; key]),
            friendly_name: name,
        }))
    };
    assert_status(
        control
            .send_routed(routed(&n, info(31, String::new())))
            .await,
        Code::InvalidArgument,
        "`frame.peer_info.x25519`: a key is exactly 32 bytes, got 31",
    );
    assert_status(
        control
            .send_routed(routed(&n, info(32, "n".repeat(256))))
            .await,
        Code::InvalidArgument,
        "`frame.peer_info.friendly_name`: a name is at most 255 bytes, got 256",
    );
    let goodbye = |reason: u32| {
        frame(pb::control_frame::Frame::Goodbye(pb::Goodbye {
            departing_id: Bytes::from_static(&[1; 16]),
            reason,
        }))
    };
    assert_status(
        control.send_routed(routed(&n, goodbye(256))).await,
        Code::InvalidArgument,
        "`frame.goodbye.reason`: a reason is 0..=255, got 256",
    );
    assert_status(
        control
            .send_direct(authed(
                pb::SendDirectRequest {
                    session_id: sid(),
                    peer: Bytes::from_static(&[1; 3]),
                    frame: plugin_payload("bad.x", 0),
                },
                t,
            ))
            .await,
        Code::InvalidArgument,
        "`peer`: a node id is exactly 16 bytes, got 3",
    );
    assert_status(
        identity
            .signing_seed(authed(pb::SigningSeedRequest { session_id: sid() }, t))
            .await,
        Code::PermissionDenied,
        "SIGNING_SEED capability",
    );
    assert_status(
        session
            .ack(authed(
                pb::AckRequest {
                    session_id: sid(),
                    seq: 99,
                },
                t,
            ))
            .await,
        Code::InvalidArgument,
        "invalid field `seq`: 99 is past the newest event, 0",
    );

    // One Events stream per session.
    let _events = session
        .events(authed(pb::EventsRequest { session_id: sid() }, t))
        .await
        .unwrap();
    assert_status(
        session
            .events(authed(pb::EventsRequest { session_id: sid() }, t))
            .await,
        Code::FailedPrecondition,
        "an Events stream is already open for this session",
    );

    // A message over the decode limit.
    let huge = authed(
        pb::RegisterRequest {
            plugin_name: "x".repeat(5 * 1024 * 1024),
            ..Default::default()
        },
        t,
    );
    let status = session.register(huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status.message().contains("4194304"),
        "the limit is named: {}",
        status.message()
    );

    // The host keeps serving this plugin and the other one.
    assert!(peers
        .lookup_x25519(lookup(&[1; 16]))
        .await
        .unwrap()
        .into_inner()
        .x25519
        .is_none());
    assert_eq!(command(&real, node(1), "env").await.split(',').count(), 4);
    host.shutdown().await;
    real.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_do_not_disturb_the_real_sidecar() {
    use tokio::io::AsyncWriteExt;
    init_logging();
    let dir = temp_dir();
    let mut config = probe_named(dir.path(), "target");
    config.connections.max_connections = 8;
    config.connections.max_streams_per_connection = 16;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let socket = host.plugin().socket_path();
    let src = node(1);
    let mut sent = 0;
    let mut deliver = |host: &FakeHost| {
        sent += 1;
        let n = sent;
        let host_plugin = host.plugin().clone();
        async move {
            pim_plugin::DaemonPlugin::handle_payload(
                &*host_plugin,
                src,
                "target.seq",
                n.to_string().into(),
            )
            .await;
            n
        }
    };

    // Garbage bytes, then a good client still works.
    let mut garbage = tokio::net::UnixStream::connect(&socket).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage")
        .await
        .unwrap();
    drop(garbage);
    // A half-open HTTP/2 connection: the preface and nothing more.
    let mut half_open = tokio::net::UnixStream::connect(&socket).await.unwrap();
    half_open
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // Slow partial frames: a frame header promising more than ever comes.
    let mut slow = tokio::net::UnixStream::connect(&socket).await.unwrap();
    slow.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x10\x04")
        .await
        .unwrap();
    // A flood of connections, far past the limit.
    let mut flood = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::UnixStream::connect(&socket).await {
            flood.push(s);
        }
    }
    let n = deliver(&host).await;
    host.ports()
        .wait_until(WAIT, |calls| {
            seen_by(calls, src, "target.seen")
                .iter()
                .any(|(_, v)| *v == n.to_string())
                .then_some(())
        })
        .await
        .expect("the real sidecar keeps receiving during a connection flood");
    // The flood's connections, which never authenticate, were evicted to
    // make room rather than keeping new ones out.
    assert!(logged(
        |l| l.contains("plugin socket full") && l.contains("target")
    ));
    drop(flood);

    // A flood of streams on one connection (health watches need no session,
    // so the probe's session stays untouched), once the flood of
    // connections has drained and a slot is free again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let ch = loop {
        if let Ok(ch) = pim_sidecar::connect_channel(&socket).await {
            if PluginSessionClient::new(ch.clone())
                .ack(authed(pb::AckRequest::default(), host.plugin().token()))
                .await
                .is_err_and(|s| s.code() == Code::InvalidArgument)
            {
                break ch;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection slot came free"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut watches = Vec::new();
    let mut held_back = 0;
    for _ in 0..40 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let req = authed(
            tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            },
            host.plugin().token(),
        );
        match tokio::time::timeout(Duration::from_millis(300), health.watch(req)).await {
            Ok(Ok(w)) => watches.push(w),
            _ => held_back += 1,
        }
    }
    println!(
        "{} watch streams open, {held_back} held back",
        watches.len()
    );
    assert_eq!(watches.len(), 16, "the per-connection stream limit holds");
    let n = deliver(&host).await;
    host.ports()
        .wait_until(WAIT, |calls| {
            seen_by(calls, src, "target.seen")
                .iter()
                .any(|(_, v)| *v == n.to_string())
                .then_some(())
        })
        .await
        .expect("the real sidecar keeps receiving during a stream flood");
    drop(watches);
    drop(half_open);
    drop(slow);
    host.shutdown().await;
}

/// A process without the token that connects as fast as it can from two
/// threads and holds every connection it gets cannot keep the plugin's
/// sidecar, or grpcurl, out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_filler_cannot_lock_a_plugin_out() {
    init_logging();
    let Some(grpcurl) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "besieged"), dir.path())
        .await
        .unwrap();
    let socket = host.plugin().socket_path();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_socket-filler"));
    cmd.arg(&socket).args(["2", "0"]);
    let filler = ChildProcess::spawn("socket-filler", cmd);
    let held = |filler: &ChildProcess| -> u64 {
        filler
            .stdout()
            .last()
            .and_then(|l| l.split(' ').nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    eventually("the filler to hold all the free slots", || {
        held(&filler) >= 15
    })
    .await;

    // A SIGKILLed sidecar's next process gets back in while the filler runs.
    let first = host.plugin().pid().unwrap();
    // SAFETY: kill has no memory-safety preconditions; `first` is our sidecar.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    eventually("the restarted sidecar to register", || {
        let stats = host.plugin().stats();
        stats.restarts == 1 && stats.connected
    })
    .await;
    let back_in = killed.elapsed();
    host.inject_payload(node(1), "besieged.seq", "still here")
        .await;
    eventually("the new process to handle a payload", || {
        !seen_by(&host.ports().calls(), node(1), "besieged.seen").is_empty()
    })
    .await;

    // grpcurl with the token gets in too.
    let base = ["-plaintext", "-unix", "-authority", "localhost", "-H"].map(String::from);
    let mut args = base.to_vec();
    args.push(format!("authorization: Bearer {}", host.plugin().token()));
    args.push(socket.display().to_string());
    args.push("list".into());
    let (ok, out, err) = run_tool(&grpcurl, &args).await;
    assert!(
        ok && out.contains("pim.plugin.v1.PluginSession"),
        "{out}{err}"
    );

    // The filler alone never fails the plugin, however long it runs.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let stats = host.plugin().stats();
    assert!(
        !stats.failed && stats.restarts == 1 && stats.connected,
        "{stats:?}"
    );
    let line = filler.stdout().last().cloned().unwrap_or_default();
    println!(
        "figure: under a filler ({line}), a SIGKILLed sidecar re-registered after {} ms",
        back_in.as_millis()
    );
    let closed: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        closed > 0,
        "the host closed none of the filler's connections: {line}"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_is_invalid_argument_with_a_bounded_message() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(external(dir.path(), "bounded"), dir.path())
        .await
        .unwrap();
    let ch = channel(&host).await;
    let token = host.plugin().token().to_owned();

    // Not protobuf, and a string field that is not UTF-8, to Register and
    // to the Events call (which the host serves with a codec of its own);
    // and a request over the message limit to Events.
    let oversized = {
        // `session_id` (field 1), one byte over the limit.
        let len = pim_sidecar::proto::limits::MAX_MESSAGE_BYTES;
        let mut b = vec![0x0a];
        prost::encoding::encode_varint(len as u64, &mut b);
        b.resize(b.len() + len, b'a');
        b
    };
    let register = "/pim.plugin.v1.PluginSession/Register";
    let events = pim_sidecar::proto::codec::EVENTS_PATH;
    let (bad, invalid) = (Code::InvalidArgument, "not a valid EventsRequest");
    let cases = [
        (
            register,
            vec![0xff, 0xff, 0xff],
            bad,
            "not a valid RegisterRequest",
        ),
        (
            register,
            vec![0x12, 0x02, 0xff, 0xfe],
            bad,
            "not a valid RegisterRequest",
        ),
        (events, vec![0xff, 0xff, 0xff], bad, invalid),
        (events, vec![0x0a, 0x02, 0xff, 0xfe], bad, invalid),
        (
            events,
            oversized,
            Code::OutOfRange,
            "decoded message length too large",
        ),
    ];
    for (path, bytes, code, needle) in cases {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await.unwrap();
        let request = authed(bytes::Bytes::from(bytes), &token);
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        if path.path() == events {
            assert_status(
                grpc.server_streaming(request, path, RawBytes).await,
                code,
                needle,
            );
        } else {
            assert_status(grpc.unary(request, path, RawBytes).await, code, needle);
        }
    }

    let request = |kinds: Vec<String>, sdk: String| {
        authed(
            pb::RegisterRequest {
                protocol_version: 1,
                plugin_name: "bounded".into(),
                payload_kinds: kinds,
                sdk_name: sdk,
                sdk_version: "0".into(),
                takeover: false,
            },
            &token,
        )
    };
    let mut session = PluginSessionClient::new(ch.clone());
    // 10,000 kinds: refused by count, in a short message.
    let many: Vec<String> = (0..10_000).map(|i| format!("bounded.k{i}")).collect();
    let status = session
        .register(request(many, "t".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("payload_kinds") && status.message().contains("1..=64"));
    assert!(status.message().len() < 200, "{}", status.message());
    // 60 wrong kinds: the mismatch lists a few, escaped, and counts the rest.
    let wrong: Vec<String> = (0..60).map(|i| format!("bounded.w{i}")).collect();
    let status = session
        .register(request(wrong, "t".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("and 52 more"),
        "{}",
        status.message()
    );
    assert!(status.message().len() < 1024, "{}", status.message());
    // A 1 MiB sdk_name: refused, naming the field and the limit.
    let kinds = vec!["bounded.cmd".to_string(), "bounded.seq".to_string()];
    let status = session
        .register(request(kinds.clone(), "x".repeat(1 << 20)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`sdk_name`") && status.message().contains("at most 128 bytes")
    );
    // A newline in sdk_name cannot forge a log line.
    let resp = session
        .register(request(kinds, "evil\nERROR forged by the sidecar".into()))
        .await
        .unwrap()
        .into_inner();
    assert!(!logged(|l| l.starts_with("ERROR forged")));
    assert!(logged(
        |l| l.contains(r#"evil\nERROR forged by the sidecar"#)
    ));
    // An oversized session id.
    let status = session
        .ack(authed(
            pb::AckRequest {
                session_id: "s".repeat(1000),
                seq: 1,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`session_id`") && status.message().contains("at most 64 bytes")
    );
    // The host keeps serving the live session.
    session
        .ack(authed(
            pb::AckRequest {
                session_id: resp.session_id,
                seq: 0,
            },
            &token,
        ))
        .await
        .unwrap();
    host.shutdown().await;
}
