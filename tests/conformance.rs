//! The conformance kit run against the sidecars of this repository: the
//! Rust echo and the Python echo pass every scenario; a sidecar that breaks
//! the protocol fails the scenario that checks it.

mod support;

use std::path::PathBuf;

use support::*;

fn kit() -> PathBuf {
    example("pim-sidecar-conformance")
}

/// Runs the kit; returns its exit status and stdout.
async fn run_kit(args: &[String]) -> (bool, String) {
    let out = tokio::process::Command::new(kit())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running the kit");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_echo_passes_every_scenario() {
    let dir = temp_dir();
    let json = dir.path().join("report.json");
    let (ok, out) = run_kit(&[
        "--json".into(),
        json.display().to_string(),
        "--".into(),
        echo_bin().display().to_string(),
    ])
    .await;
    assert!(ok && out.contains("10 passed, 0 failed"), "{out}");
    println!(
        "figure: conformance, Rust echo: {}",
        out.lines().last().unwrap_or_default()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], 10);
    assert_eq!(report["scenarios"].as_array().unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_breaks_the_protocol_fails_and_unclaimed_scenarios_are_said() {
    // The probe claims other kinds than an echo: it cannot register as one.
    let (ok, out) = run_kit(&[
        "--claims".into(),
        "register,shutdown".into(),
        "--".into(),
        probe_bin().display().to_string(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("register   FAIL: it did not register"),
        "{out}"
    );
    assert!(out.contains("in_order   not claimed"), "{out}");
    assert!(out.contains("0 passed, 2 failed"), "{out}");
    let (ok, out) = run_kit(&["--claims".into(), "bogus".into(), "--".into(), "x".into()]).await;
    assert!(!ok && out.is_empty());
}
