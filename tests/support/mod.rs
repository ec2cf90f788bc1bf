//! Shared harness of the multi-process tests: temp dirs, the sidecar
//! binaries, test logging (sidecar output is forwarded into the test's
//! captured output, shown when a test fails), and bounded waits.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use pim_core::NodeId;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_protocol::ControlFrame;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Sends the host's and the sidecars' logs to the test output.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

/// A fresh temporary directory for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pim-test-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Path of a binary of this package.
pub fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_probe-sidecar"))
}

/// Path of the echo sidecar.
pub fn echo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_echo-sidecar"))
}

/// A spawn config for the probe sidecar in `dir`.
pub fn probe_config(dir: &Path) -> SidecarConfig {
    SidecarConfig::spawn(
        "probe",
        ["probe.cmd", "probe.seq"],
        dir.join("sock"),
        CommandSpec::new(probe_bin()).env("RUST_LOG", "debug"),
    )
}

/// Node ids for tests.
pub fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 16])
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a probe command from `src` and waits for its `probe.reply`.
pub async fn command(host: &FakeHost, src: NodeId, cmd: &str) -> String {
    let before = replies(host, src).len();
    host.inject_payload(src, "probe.cmd", cmd.to_owned()).await;
    host.ports()
        .wait_until(WAIT, |calls| {
            let r = sent_direct(calls, src, "probe.reply");
            (r.len() > before).then(|| r[before].clone())
        })
        .await
        .unwrap_or_else(|e| panic!("no reply to `{cmd}`: {e}"))
}

/// The `probe.reply` bodies sent directly to `to`, in order.
pub fn replies(host: &FakeHost, to: NodeId) -> Vec<String> {
    sent_direct(host.ports().calls().as_slice(), to, "probe.reply")
}

/// Bodies of `kind` payloads sent directly to `to`, in order.
pub fn sent_direct(calls: &[PortCall], to: NodeId, kind: &str) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| match c {
            PortCall::SendDirect {
                peer,
                frame: ControlFrame::PluginPayload { kind: k, body },
            } if *peer == to && k == kind => Some(String::from_utf8_lossy(body).into_owned()),
            _ => None,
        })
        .collect()
}

/// Whether a process with this id exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits, bounded, until `cond` holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Finds a test tool: `$env_var`, then `.venv/bin/<name>` or
/// `.tools/node_modules/.bin/<name>` in the workspace, then `PATH`. Under
/// `CI=true` a missing tool fails the test; elsewhere the test is skipped
/// with the reason printed.
pub fn tool(name: &str, env_var: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = std::env::var_os(env_var)
        .map(PathBuf::from)
        .into_iter()
        .chain([
            root.join(".venv/bin").join(name),
            root.join(".tools/node_modules/.bin").join(name),
        ])
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    let why = format!(
        "{name} not found (set {env_var}, or run tests/run.sh, which installs it into the workspace)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Standard base64 (for bytes fields in grpcurl's JSON).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs a command to completion (bounded by [`WAIT`]) and returns its
/// exit success, stdout and stderr.
pub async fn run_tool(program: &Path, args: &[String]) -> (bool, String, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, child)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} did not finish within {WAIT:?}",
                program.display()
            )
        })
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
