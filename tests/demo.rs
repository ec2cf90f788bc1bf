//! The demo host runs its whole scenario with real echo sidecar processes
//! and exits 0.

mod support;

use support::*;

#[tokio::test]
async fn the_demo_host_runs_its_scenario() {
    let (ok, out, err) = run_tool(&example("demo-host"), &[]).await;
    assert!(ok, "demo-host failed:\n{out}\n{err}");
    for line in [
        r#"payload  alice -> bob: PluginPayload echo.ping "hi bob" => plugin echo"#,
        r#"host rpc bob: LookupName(alice) -> Some("alice")"#,
        "host rpc bob: SendRouted(to alice) -> attempted",
        r#"payload  bob -> alice: PluginPayload echo.pong "hello alice, you said: hi bob" => plugin echo"#,
        r#"payload  carol -> alice: PluginPayload echo.pong "hello alice, you said: hi carol" => plugin echo"#,
        "alice: delivered 4 acked 4 dropped 0 restarts 0",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}\n{err}");
    }
    assert!(
        err.contains("peer forgotten"),
        "alice's sidecar did not see carol forgotten:\n{err}"
    );
}

/// Socket files below `dir`, at any depth.
fn sockets_below(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "sock") {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_demo_host_stops_cleanly_on_sigterm() {
    let dir = temp_dir();
    let mut cmd = tokio::process::Command::new(example("demo-host"));
    cmd.arg("--serve").arg("--dir").arg(dir.path());
    let mut demo = ChildProcess::spawn("demo-host --serve", cmd);
    demo.wait_line("the grpcurl variables", |l| l.starts_with("export SOCK="))
        .await;
    assert!(!sockets_below(dir.path()).is_empty());
    demo.signal(libc::SIGTERM);
    let status = demo.wait().await;
    assert!(status.success(), "demo-host exited with {status}");
    let left = sockets_below(dir.path());
    assert!(left.is_empty(), "sockets left: {left:?}");
}
