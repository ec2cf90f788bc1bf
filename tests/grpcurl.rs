//! Real grpcurl against a live host socket: list, describe, health, and a
//! Register followed by LookupName, as the README's debugging section shows.

mod support;

use pim_plugin_bridge::testkit::FakeHost;
use pim_plugin_bridge::SidecarConfig;
use support::*;

struct Grpcurl {
    bin: std::path::PathBuf,
    socket: String,
    token: String,
}

impl Grpcurl {
    /// Runs `grpcurl -plaintext -unix -authority localhost [-H auth] <extra> <socket> <rest>`.
    async fn call(
        &self,
        with_token: bool,
        extra: &[&str],
        rest: &[&str],
    ) -> (bool, String, String) {
        let mut args: Vec<String> = ["-plaintext", "-unix", "-authority", "localhost"]
            .map(String::from)
            .to_vec();
        if with_token {
            args.push("-H".into());
            args.push(format!("authorization: Bearer {}", self.token));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.socket.clone());
        args.extend(rest.iter().map(|s| s.to_string()));
        run_tool(&self.bin, &args).await
    }

    async fn ok(&self, extra: &[&str], rest: &[&str]) -> String {
        let (ok, out, err) = self.call(true, extra, rest).await;
        assert!(ok, "grpcurl {extra:?} {rest:?} failed:\n{out}\n{err}");
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_the_host() {
    init_logging();
    let Some(bin) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let dir = temp_dir();
    let config = SidecarConfig::external("probe", ["probe.cmd"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let alice = node(2);
    host.ports().add_peer(alice, [0xa1; 32], "alice");
    let g = Grpcurl {
        bin,
        socket: host.plugin().socket_path().display().to_string(),
        token: host.plugin().token().to_owned(),
    };

    let list = g.ok(&[], &["list"]).await;
    for service in [
        "pim.plugin.v1.PluginSession",
        "pim.plugin.v1.PeerDirectory",
        "pim.plugin.v1.ControlSender",
        "pim.plugin.v1.IdentitySecrets",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.lines().any(|l| l == service),
            "{service} not listed:\n{list}"
        );
    }

    let described = g
        .ok(&[], &["describe", "pim.plugin.v1.PluginSession"])
        .await;
    assert!(described.contains("rpc Register"), "{described}");
    assert!(
        described.contains("Register opens a session"),
        "comments not served:\n{described}"
    );
    let frame = g.ok(&[], &["describe", "pim.plugin.v1.ControlFrame"]).await;
    for variant in [
        "goodbye",
        "rekey",
        "ping",
        "pong",
        "peer_info",
        "plugin_payload",
    ] {
        assert!(
            frame.contains(variant),
            "ControlFrame lacks {variant}:\n{frame}"
        );
    }

    let health = g.ok(&[], &["grpc.health.v1.Health/Check"]).await;
    assert!(health.contains("SERVING"), "{health}");

    let registered = g
        .ok(
            &["-d", r#"{"protocol_version": 1, "plugin_name": "probe", "payload_kinds": ["probe.cmd"]}"#],
            &["pim.plugin.v1.PluginSession/Register"],
        )
        .await;
    let session = registered
        .split("\"sessionId\": \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no sessionId in {registered}"))
        .to_owned();

    let lookup = |node: [u8; 16]| {
        format!(
            r#"{{"session_id": "{session}", "node": "{}"}}"#,
            base64(&node)
        )
    };
    let found = g
        .ok(
            &["-d", &lookup(*alice.as_bytes())],
            &["pim.plugin.v1.PeerDirectory/LookupName"],
        )
        .await;
    assert!(found.contains(r#""name": "alice""#), "{found}");
    let absent = g
        .ok(
            &["-d", &lookup([7; 16])],
            &["pim.plugin.v1.PeerDirectory/LookupName"],
        )
        .await;
    let absent: String = absent.split_whitespace().collect();
    assert_eq!(absent, "{}", "an unknown peer is an empty answer");

    let (ok, _, err) = g.call(false, &[], &["list"]).await;
    assert!(!ok, "a call without the token must fail");
    assert!(err.contains("Unauthenticated"), "{err}");

    let short = format!(
        r#"{{"session_id": "{session}", "node": "{}"}}"#,
        base64(&[1; 3])
    );
    let (ok, _, err) = g
        .call(
            true,
            &["-d", &short],
            &["pim.plugin.v1.PeerDirectory/LookupName"],
        )
        .await;
    assert!(!ok, "a 3-byte node id must be refused");
    assert!(
        err.contains("InvalidArgument")
            && err.contains("invalid field `node`: a node id is exactly 16 bytes, got 3"),
        "{err}"
    );
    host.shutdown().await;
}
