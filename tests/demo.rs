//! The demo host runs its whole scenario with real echo sidecar processes
//! and exits 0.

mod support;

use support::*;

#[tokio::test]
async fn the_demo_host_runs_its_scenario() {
    let (ok, out, err) = run_tool(std::path::Path::new(env!("CARGO_BIN_EXE_demo-host")), &[]).await;
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
