//! Real grpcurl against a live host socket: every command of the README's
//! debugging section, run exactly as written (by bash, with the README's
//! variables set), plus the errors a user meets without the token or with
//! a bad field.

mod support;

use pim_plugin_bridge::testkit::FakeHost;
use pim_plugin_bridge::SidecarConfig;
use support::*;

/// The lines of the README block marked `grpcurl-commands`.
fn readme_commands() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- grpcurl-commands")
        .expect("the README marks its grpcurl block");
    let block = &readme[start..];
    let body = &block[block
        .find("```sh\n")
        .expect("a sh block follows the marker")
        + 6..];
    let body = &body[..body.find("```").expect("the block ends")];
    body.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_grpcurl_command_works_as_written() {
    init_logging();
    let Some(grpcurl) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let dir = temp_dir();
    let config =
        SidecarConfig::external("echo", ["echo.ping", "echo.pong"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let alice = node(2);
    host.ports().add_peer(alice, [0xa1; 32], "alice");
    host.inject_payload(alice, "echo.ping", "queued before")
        .await;

    let lines = readme_commands();
    assert!(
        lines[0].starts_with("export SOCK="),
        "the block starts by setting its variables"
    );
    let path = format!(
        "{}:{}",
        grpcurl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut session = String::new();
    let mut outputs = Vec::new();
    for line in &lines[1..] {
        let script = if line.starts_with("SESSION=") {
            format!("{line}\nprintf '%s' \"$SESSION\"")
        } else {
            line.clone()
        };
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["-c", &script])
            .env("PATH", &path)
            .env("SOCK", host.plugin().socket_path())
            .env("TOKEN", host.plugin().token())
            .env("NODE", base64(alice.as_bytes()))
            .env("SESSION", &session)
            .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let streaming = line.contains("-max-time");
        assert!(
            out.status.success() || (streaming && stderr.contains("DeadlineExceeded")),
            "README command failed: {line}\n{stdout}\n{stderr}"
        );
        if line.starts_with("SESSION=") {
            session = stdout.trim().to_owned();
            assert_eq!(session.len(), 32, "no session id from: {line}");
        }
        outputs.push((line.clone(), stdout));
    }
    let find = |needle: &str| {
        &outputs
            .iter()
            .find(|(l, _)| l.contains(needle))
            .unwrap_or_else(|| panic!("no README command with {needle}"))
            .1
    };
    let list = find(" list");
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
    let described = find("describe");
    assert!(described.contains("rpc Register"), "{described}");
    assert!(
        described.contains("Register opens a session"),
        "comments not served:\n{described}"
    );
    assert!(find("Health/Check").contains("SERVING"));
    assert!(find("LookupName").contains(r#""name": "alice""#));
    let events = find("Events");
    assert!(
        events.contains(r#""kind": "echo.ping""#) && events.contains(r#""seq": "1""#),
        "the queued event is streamed:\n{events}"
    );
    assert_eq!(
        host.plugin().stats().queue.acked_seq,
        0,
        "grpcurl does not ack"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_shows_clear_errors() {
    init_logging();
    let Some(grpcurl) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let dir = temp_dir();
    let config = SidecarConfig::external("probe", ["probe.cmd"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let sock = host.plugin().socket_path().display().to_string();
    let base = ["-plaintext", "-unix", "-authority", "localhost"].map(String::from);
    let auth = format!("authorization: Bearer {}", host.plugin().token());

    let mut args = base.to_vec();
    args.extend([sock.clone(), "list".into()]);
    let (ok, _, err) = run_tool(&grpcurl, &args).await;
    assert!(
        !ok && err.contains("Unauthenticated"),
        "without the token: {err}"
    );

    let mut args = base.to_vec();
    args.extend(["-H".into(), auth.clone(), "-d".into()]);
    args.push(
        r#"{"protocol_version": 1, "plugin_name": "probe", "payload_kinds": ["probe.cmd"]}"#.into(),
    );
    args.extend([sock.clone(), "pim.plugin.v1.PluginSession/Register".into()]);
    let (ok, out, err) = run_tool(&grpcurl, &args).await;
    assert!(ok, "{out}{err}");
    let session = out
        .split("\"sessionId\": \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();

    let mut args = base.to_vec();
    args.extend(["-H".into(), auth, "-d".into()]);
    args.push(format!(
        r#"{{"session_id": "{session}", "node": "{}"}}"#,
        base64(&[1; 3])
    ));
    args.extend([sock, "pim.plugin.v1.PeerDirectory/LookupName".into()]);
    let (ok, _, err) = run_tool(&grpcurl, &args).await;
    assert!(
        !ok && err.contains("InvalidArgument")
            && err.contains("invalid field `node`: a node id is exactly 16 bytes, got 3"),
        "{err}"
    );
    host.shutdown().await;
}

/// The README's Register line, with `"takeover": true`, against a live
/// sidecar: the sidecar is told it was superseded and stops, once; no war.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_register_line_takes_over_a_live_sidecar_once() {
    init_logging();
    let Some(grpcurl) = tool("grpcurl", "PIM_GRPCURL") else {
        return;
    };
    let dir = temp_dir();
    let config =
        SidecarConfig::external("echo", ["echo.ping", "echo.pong"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let mut echo_cmd = tokio::process::Command::new(echo_bin());
    echo_cmd
        .env_clear()
        .env("PIM_PLUGIN_SOCKET", host.plugin().socket_path())
        .env("PIM_PLUGIN_TOKEN_FILE", dir.path().join("sock/echo.token"))
        .env("RUST_LOG", "info");
    let mut echo = ChildProcess::spawn("live echo", echo_cmd);
    eventually("the live echo", || host.plugin().stats().connected).await;
    let register = readme_commands()
        .into_iter()
        .find(|l| l.starts_with("SESSION="))
        .expect("the README's Register line");
    assert!(register.contains(r#""takeover": true"#), "{register}");
    let path = format!(
        "{}:{}",
        grpcurl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .args(["-c", &format!("{register}\nprintf '%s' \"$SESSION\"")])
        .env("PATH", &path)
        .env("SOCK", host.plugin().socket_path())
        .env("TOKEN", host.plugin().token())
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim().len(),
        32,
        "{out:?}"
    );
    let status = tokio::time::timeout(WAIT, echo.wait())
        .await
        .expect("the taken-over echo stops");
    assert!(status.success(), "{status:?}");
    assert!(echo
        .lines()
        .iter()
        .any(|l| l.contains("another client took this plugin's session over: stopping")));
    assert_eq!(
        logged_lines(|l| l.contains("took the live session over")).len(),
        1,
        "one takeover"
    );
    host.shutdown().await;
}
