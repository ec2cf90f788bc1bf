//! Shared harness of the multi-process tests: temp dirs, the sidecar
//! binaries, test logging (sidecar output is forwarded into the test's
//! captured output, shown when a test fails), and bounded waits.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use pim_core::NodeId;
use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_protocol::ControlFrame;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Every log line of this test binary, for tests that check what was logged.
static LOGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Writes log output to the test's captured output and to [`LOGS`].
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        print!("{text}");
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(text.lines().map(str::to_owned));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the host's and the sidecars' logs to the test output (shown when a
/// test fails) and keeps them for [`logged`].
pub fn init_logging() {
    let level = std::env::var("PIM_TEST_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(|| Tee)
        .with_ansi(false)
        .with_max_level(level)
        .try_init();
}

/// Whether a log line so far satisfies `pred`.
pub fn logged(pred: impl Fn(&str) -> bool) -> bool {
    LOGS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|l| pred(l))
}

/// The log lines so far that satisfy `pred`.
#[allow(dead_code)]
pub fn logged_lines(pred: impl Fn(&str) -> bool) -> Vec<String> {
    LOGS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| pred(l))
        .cloned()
        .collect()
}

/// Sends one command to an example sidecar's line-based control socket
/// (the echo's `ECHO_CONTROL`, the messaging sidecar's `messaging.ctl`) and
/// returns its reply: one line, or up to `end` for `history`.
pub async fn control(path: &Path, command: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    eventually("a control socket", || path.exists()).await;
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut reply = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = !command.starts_with("history") || line == "end";
            reply.push(line);
            if done {
                break;
            }
        }
        reply.join("\n")
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("`{command}` on {} got no reply", path.display()))
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
    example("echo-sidecar")
}

/// Path of the examples' binary `name`, built first if needed.
pub fn example(name: &str) -> PathBuf {
    pim_sidecar_examples::example_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A spawn config for the probe sidecar in `dir`.
pub fn probe_config(dir: &Path) -> SidecarConfig {
    probe_named(dir, "probe")
}

/// A spawn config for a probe sidecar called `name` (kinds `<name>.cmd`
/// and `<name>.seq`) in `dir`.
pub fn probe_named(dir: &Path, name: &str) -> SidecarConfig {
    SidecarConfig::spawn(
        name,
        [format!("{name}.cmd"), format!("{name}.seq")],
        dir.join("sock"),
        CommandSpec::new(probe_bin()).env(
            "RUST_LOG",
            std::env::var("PIM_TEST_LOG").unwrap_or_else(|_| "info".into()),
        ),
    )
}

/// The `(pid, body)` of each `<kind>` payload sent directly to `to`, where
/// the body is `<pid> <rest>` (the probe's `.seen` replies).
pub fn seen_by(calls: &[PortCall], to: NodeId, kind: &str) -> Vec<(u32, String)> {
    sent_direct(calls, to, kind)
        .into_iter()
        .filter_map(|b| {
            let (pid, rest) = b.split_once(' ')?;
            Some((pid.parse().ok()?, rest.to_owned()))
        })
        .collect()
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
    let name = host.plugin().name();
    let reply_kind = format!("{name}.reply");
    let before = sent_direct(&host.ports().calls(), src, &reply_kind).len();
    host.inject_payload(src, &format!("{name}.cmd"), cmd.to_owned())
        .await;
    host.ports()
        .wait_until(WAIT, |calls| {
            let r = sent_direct(calls, src, &reply_kind);
            (r.len() > before).then(|| r[before].clone())
        })
        .await
        .unwrap_or_else(|e| panic!("no reply to `{cmd}`: {e}"))
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

/// Whether a process with this id is alive (a zombie counts as dead).
pub fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits, bounded by [`WAIT`], until `cond` holds: the test kit's
/// `poll_until`, failing the test on timeout.
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    if let Err(e) = pim_plugin_bridge::testkit::poll_until(what, WAIT, cond).await {
        panic!("{e:#}");
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

#[allow(unused_imports)]
pub use pim_sidecar_examples::base64;

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

/// A child process of a test: killed on drop, its output collected and
/// printed if the test fails.
pub struct ChildProcess {
    child: tokio::process::Child,
    name: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdin: Option<tokio::process::ChildStdin>,
    notify: std::sync::Arc<tokio::sync::Notify>,
    /// The tasks reading its stdout and stderr.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl ChildProcess {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(name: &str, mut cmd: tokio::process::Command) -> Self {
        use tokio::io::AsyncBufReadExt;
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut readers = Vec::new();
        for (stream, tag) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "out",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "err",
            ),
        ] {
            let Some(stream) = stream else { continue };
            let (lines, notify) = (lines.clone(), notify.clone());
            readers.push(tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(format!("{tag}: {line}"));
                    notify.notify_waiters();
                }
            }));
        }
        Self {
            stdin: child.stdin.take(),
            child,
            name: name.to_owned(),
            lines,
            notify,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child has not been reaped")
    }

    /// Writes a line to its stdin.
    pub async fn send(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits until a stdout line matching `pred` appears; returns it.
    pub async fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                if let Some(l) = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|l| l.strip_prefix("out: "))
                    .find(|l| pred(l))
                {
                    return l.to_owned();
                }
                notified.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("{} never printed {what}", self.name))
    }

    /// Stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("out: ").map(str::to_owned))
            .collect()
    }

    /// Every output line so far, `out: ` or `err: ` first.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped yet (we hold it), so the pid is still ours.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// SIGKILLs it and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits (bounded) for it to exit, and for its last output lines to be
    /// read (bounded too: a child of its own may hold the pipes open).
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {WAIT:?}", self.name))
            .unwrap();
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- output of {} ---", self.name);
            for line in self.lines.lock().unwrap().iter() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.start_kill();
    }
}

/// Path of the daemon stand-in.
pub fn test_host_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_test-host"))
}

/// Whether this process runs as root. A test that needs root returns early
/// when it does not, saying why, except under `CI=true` (CI runs as root),
/// where it fails instead.
pub fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true runs as root, but this test does not: {why}"
    );
    eprintln!("SKIPPED: {why}");
    false
}

/// Starts `program` as the required sidecar `name` claiming `kinds` and
/// returns the error the start fails with.
pub async fn start_error(dir: &Path, name: &str, kinds: &[&str], program: PathBuf) -> String {
    let mut config = SidecarConfig::spawn(
        name,
        kinds.iter().copied(),
        dir.join("sock"),
        CommandSpec::new(program),
    );
    config.required = true;
    FakeHost::start(config, dir)
        .await
        .expect_err("the start must fail")
        .to_string()
}

/// `(seq, count)` from a counter sidecar's file (`<host instance> <seq>
/// <count>`, examples/counter and examples/python/counter_sidecar.py).
pub fn counter_file(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut words = text.split_whitespace().skip(1);
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// Sends `hits` `counter.hit` payloads to a counter sidecar whose state file
/// is `file`, SIGKILLs it while it has stored events it has not acked yet,
/// waits for every hit to be acked, and checks that each was counted once
/// and that the sidecar answers `counter.get` with that count. Returns the
/// seq it was killed after.
pub async fn count_once_across_sigkill(host: &FakeHost, file: &Path, hits: u64) -> u64 {
    let src = node(3);
    for _ in 0..hits {
        host.inject_payload(src, "counter.hit", "").await;
    }
    let first = host.plugin().pid().unwrap();
    eventually(
        "stored events not acked yet, past a quarter of the hits",
        || {
            let acked = host.plugin().stats().queue.acked_seq;
            counter_file(file).is_some_and(|(seq, _)| seq > hits / 4 && seq > acked + 2)
        },
    )
    .await;
    // SAFETY: kill has no memory-safety preconditions; `first` is our sidecar.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let (killed_after, _) = counter_file(file).unwrap();
    eventually("every hit acked", || {
        host.plugin().stats().queue.acked_seq >= hits
    })
    .await;
    let stats = host.plugin().stats();
    assert!(stats.restarts >= 1, "{stats:?}");
    assert!(
        stats.queue.replayed > 0,
        "nothing was replayed: the test proves nothing"
    );
    assert_eq!(
        counter_file(file).map(|(_, c)| c),
        Some(hits),
        "each hit counted once"
    );
    host.inject_payload(src, "counter.get", "").await;
    let answer = host
        .ports()
        .wait_until(WAIT, |calls| sent_direct(calls, src, "counter.count").pop())
        .await
        .unwrap();
    assert_eq!(answer, hits.to_string());
    killed_after
}

/// A gRPC codec that sends the bytes it is given and receives bytes, for
/// messages no generated client or server would write.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, Self::Error> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n)))
    }
}
