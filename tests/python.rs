//! The Python sidecar (examples/python, grpcio) and the Node.js one
//! (examples/node, @grpc/grpc-js) spawned through the bridge exactly like
//! the Rust echo, and checked for the same behaviour: the echo exchange,
//! in-order delivery with crash resume, clean shutdown, a clear refusal,
//! and the conformance kit; the Python module's Watch stream followed on a
//! thread of its own; and both modules' constants compared with the host's.

mod support;

use std::path::PathBuf;

use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_protocol::ControlFrame;
use pim_sidecar_examples::python_dir;
use support::*;

/// The Python with grpcio and grpcio-tools (`PIM_PYTHON`, else the
/// workspace's .venv), with the stubs generated; `None` (skip) outside CI
/// when it is missing.
async fn python() -> Option<PathBuf> {
    tokio::task::spawn_blocking(|| pim_sidecar_examples::python_or_skip("this test"))
        .await
        .expect("looking for python")
}

enum Echo {
    Rust,
    Python(PathBuf),
    Node(PathBuf),
}

fn node_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node"))
}

/// Node.js with the packages of examples/node installed (`PIM_NODE`, else
/// `node` in PATH); `None` (skip) outside CI when either is missing.
fn node_js() -> Option<PathBuf> {
    let node = std::env::var_os("PIM_NODE")
        .map(PathBuf::from)
        .or_else(|| tool("node", "PIM_NODE"))?;
    let ready = node_dir().join("node_modules/@grpc/grpc-js").is_dir();
    if !ready {
        let why = "examples/node/node_modules is missing (run tests/run.sh)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {why}"
        );
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(node)
}

/// What the sandbox must let the Node.js sidecar read: its module with
/// its packages, and the protocol's .proto files it loads.
fn node_read_paths() -> Vec<PathBuf> {
    vec![
        node_dir(),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"))
            .canonicalize()
            .expect("proto/"),
    ]
}

/// What the sandbox must let a Python sidecar read besides the system.
fn python_read_paths(python: &std::path::Path) -> Vec<PathBuf> {
    pim_sidecar_examples::python_read_paths(python, &[]).expect("python's prefixes")
}

fn echo_config(dir: &std::path::Path, echo: &Echo) -> SidecarConfig {
    let command = match echo {
        Echo::Rust => CommandSpec::new(echo_bin()),
        Echo::Python(python) => CommandSpec::new(python).arg(python_dir().join("echo_sidecar.py")),
        Echo::Node(node) => CommandSpec::new(node).arg(node_dir().join("echo_sidecar.js")),
    };
    let mut config = SidecarConfig::spawn(
        "echo",
        ["echo.ping", "echo.pong"],
        dir.join("sock"),
        command,
    );
    config.stuck_timeout = None;
    match echo {
        // Sandboxed like every spawned sidecar; an interpreter reads its own tree.
        Echo::Python(python) => config.sandbox.read_paths = python_read_paths(python),
        Echo::Node(_) => config.sandbox.read_paths = node_read_paths(),
        Echo::Rust => {}
    }
    config
}

fn pongs_to(calls: &[PortCall], to: pim_core::NodeId) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| match c {
            PortCall::SendRouted {
                dst,
                frame: ControlFrame::PluginPayload { kind, body },
                ..
            } if *dst == to && kind == "echo.pong" => {
                Some(String::from_utf8_lossy(body).into_owned())
            }
            _ => None,
        })
        .collect()
}

async fn echo_answers_by_name(echo: Echo) {
    let dir = temp_dir();
    let host = FakeHost::start(echo_config(dir.path(), &echo), dir.path())
        .await
        .unwrap();
    let (alice, stranger) = (node(1), node(2));
    host.ports().add_peer(alice, [1; 32], "alice");
    host.inject_payload(alice, "echo.ping", "hi").await;
    host.inject_payload(stranger, "echo.ping", "who?").await;
    host.ports()
        .wait_until(WAIT, |calls| {
            (pongs_to(calls, stranger).len() == 1).then_some(())
        })
        .await
        .unwrap();
    assert_eq!(
        pongs_to(&host.ports().calls(), alice),
        ["hello alice, you said: hi"]
    );
    assert_eq!(
        pongs_to(&host.ports().calls(), stranger),
        ["hello stranger, you said: who?"]
    );
    let calls = host.ports().calls();
    let attempted: Vec<bool> = calls
        .iter()
        .filter_map(|c| match c {
            PortCall::SendRouted { attempted, .. } => Some(*attempted),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempted,
        [true, false],
        "SendRouted true and false both reach the plugin"
    );
    let pid = host.plugin().pid().unwrap();
    let socket = host.plugin().socket_path();
    host.shutdown().await;
    assert!(!process_exists(pid) && !socket.exists());
    assert_eq!(
        host.plugin().stats().last_exit.as_deref(),
        Some("exit status 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_echo_answers_by_name() {
    init_logging();
    echo_answers_by_name(Echo::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_echo_answers_by_name() {
    init_logging();
    let Some(python) = python().await else { return };
    echo_answers_by_name(Echo::Python(python)).await;
}

async fn resumes_after_a_crash(echo: Echo) {
    let dir = temp_dir();
    let host = FakeHost::start(echo_config(dir.path(), &echo), dir.path())
        .await
        .unwrap();
    let alice = node(1);
    host.ports().add_peer(alice, [1; 32], "alice");
    let n = 300;
    for i in 0..n {
        host.inject_payload(alice, "echo.ping", i.to_string()).await;
    }
    let first = host.plugin().pid().unwrap();
    host.ports()
        .wait_until(WAIT, |calls| (calls.len() >= 100).then_some(()))
        .await
        .unwrap();
    // SAFETY: kill has no memory-safety preconditions; `first` is our sidecar.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let last = format!("hello alice, you said: {}", n - 1);
    host.ports()
        .wait_until(WAIT, |calls| {
            calls.last().and_then(|c| match c {
                PortCall::SendRouted {
                    frame: ControlFrame::PluginPayload { body, .. },
                    ..
                } if body == last.as_bytes() => Some(()),
                _ => None,
            })
        })
        .await
        .unwrap();
    let answered: Vec<u32> = pongs_to(&host.ports().calls(), alice)
        .iter()
        .map(|p| p.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    let mut unique = answered.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (0..n).collect::<Vec<_>>(), "a ping was lost");
    // In order within each process: the sequence only restarts once, at the crash.
    let restarts = answered.windows(2).filter(|w| w[1] <= w[0]).count();
    assert!(
        restarts <= 1,
        "out of order beyond the one replay point: {answered:?}"
    );
    println!("{} duplicates after the crash", answered.len() - n as usize);
    assert_eq!(host.plugin().stats().restarts, 1);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_echo_resumes_after_a_crash() {
    init_logging();
    resumes_after_a_crash(Echo::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_echo_resumes_after_a_crash() {
    init_logging();
    let Some(python) = python().await else { return };
    resumes_after_a_crash(Echo::Python(python)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_echo_with_the_wrong_name_is_refused_clearly() {
    init_logging();
    let Some(python) = python().await else { return };
    let dir = temp_dir();
    let mut config = echo_config(dir.path(), &Echo::Python(python));
    config.name = "greeter".into();
    config.required = true;
    let err = FakeHost::start(config, dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin name mismatch: the sidecar registered as `echo`, this socket is configured for `greeter`")
            && err.contains("exit status 78"),
        "{err}"
    );
}

/// `restart()` sends SIGTERM: each SDK finishes, acks, runs its clean-up
/// and exits 0, and the new process answers.
async fn restart_stops_cleanly_on_sigterm(echo: Echo) {
    let dir = temp_dir();
    let host = FakeHost::start(echo_config(dir.path(), &echo), dir.path())
        .await
        .unwrap();
    let alice = node(1);
    host.ports().add_peer(alice, [1; 32], "alice");
    host.inject_payload(alice, "echo.ping", "before").await;
    host.ports()
        .wait_until(WAIT, |calls| {
            (pongs_to(calls, alice).len() == 1).then_some(())
        })
        .await
        .unwrap();
    let old = host.plugin().pid().unwrap();
    host.plugin().restart().await.unwrap();
    let stats = host.plugin().stats();
    assert_eq!(
        stats.last_exit.as_deref(),
        Some("exit status 0"),
        "{stats:?}"
    );
    assert_eq!(stats.replacements, 1);
    assert_ne!(host.plugin().pid(), Some(old));
    host.inject_payload(alice, "echo.ping", "after").await;
    host.ports()
        .wait_until(WAIT, |calls| {
            (pongs_to(calls, alice).len() == 2).then_some(())
        })
        .await
        .unwrap();
    assert_eq!(
        pongs_to(&host.ports().calls(), alice),
        [
            "hello alice, you said: before",
            "hello alice, you said: after"
        ]
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_echo_stops_cleanly_when_restarted() {
    init_logging();
    restart_stops_cleanly_on_sigterm(Echo::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_echo_stops_cleanly_when_restarted() {
    init_logging();
    let Some(python) = python().await else { return };
    restart_stops_cleanly_on_sigterm(Echo::Python(python)).await;
}

/// The Python module's server streams are each read on the thread that
/// iterates them: a sidecar following `Host.watch()` on a thread of its
/// own sees a peer learnt and forgotten while its main thread goes on
/// delivering events (tests/python/watch_sidecar.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_module_watches_peers_on_a_thread_of_its_own() {
    init_logging();
    let Some(python) = python().await else { return };
    let dir = temp_dir();
    let scripts = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/python"));
    let mut config = SidecarConfig::spawn(
        "watch",
        ["watch.ping"],
        dir.path().join("sock"),
        CommandSpec::new(&python).arg(scripts.join("watch_sidecar.py")),
    );
    config.stuck_timeout = None;
    config.sandbox.read_paths =
        pim_sidecar_examples::python_read_paths(&python, &[scripts]).expect("python's prefixes");
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    host.ports()
        .wait_until(WAIT, |calls| {
            calls.contains(&PortCall::Subscribe).then_some(())
        })
        .await
        .unwrap();
    let alice = node(1);
    // The body of the first payload of kind `want` sent direct to alice.
    let sent_to_alice = |want: &'static str| {
        host.ports().wait_until(WAIT, move |calls| {
            calls.iter().find_map(|c| match c {
                PortCall::SendDirect {
                    peer,
                    frame: ControlFrame::PluginPayload { kind, body },
                } if *peer == alice && kind == want => {
                    Some(String::from_utf8_lossy(body).into_owned())
                }
                _ => None,
            })
        })
    };
    host.ports().add_peer(alice, [1; 32], "alice");
    assert_eq!(sent_to_alice("watch.seen").await.unwrap(), "alice");
    host.inject_payload(alice, "watch.ping", "still delivering")
        .await;
    assert_eq!(
        sent_to_alice("watch.pong").await.unwrap(),
        "still delivering"
    );
    host.ports().forget_peer(alice);
    sent_to_alice("watch.forgotten").await.unwrap();
    let pid = host.plugin().pid().unwrap();
    host.shutdown().await;
    assert!(!process_exists(pid));
    assert_eq!(
        host.plugin().stats().last_exit.as_deref(),
        Some("exit status 0")
    );
}

/// The Python module keeps the takeover rule: taken over, it stops (exit 0,
/// no new Register); started while another client is live, it waits and
/// registers once that client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_module_stops_when_taken_over_and_waits_its_turn() {
    init_logging();
    let Some(python) = python().await else { return };
    let dir = temp_dir();
    let config =
        SidecarConfig::external("echo", ["echo.ping", "echo.pong"], dir.path().join("sock"));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let client = |label: &str, program: &std::path::Path, script: bool, takeover: bool| {
        let mut cmd = tokio::process::Command::new(program);
        if script {
            cmd.arg(python_dir().join("echo_sidecar.py"));
        }
        cmd.env_clear()
            .env("PIM_PLUGIN_SOCKET", dir.path().join("sock/echo.sock"))
            .env("PIM_PLUGIN_TOKEN_FILE", dir.path().join("sock/echo.token"))
            .env("PIM_PLUGIN_NAME", "echo")
            .env("RUST_LOG", "info");
        if takeover {
            cmd.env("PIM_PLUGIN_TAKEOVER", "1");
        }
        ChildProcess::spawn(label, cmd)
    };
    let mut first = client("python 1", &python, true, false);
    eventually("the Python client", || host.plugin().stats().connected).await;
    let taker = client("rust taker", &echo_bin(), false, true);
    let status = tokio::time::timeout(WAIT, first.wait())
        .await
        .expect("the superseded Python client stops");
    assert!(status.success(), "{status:?}");
    assert!(
        first
            .lines()
            .iter()
            .any(|l| l.contains("another client took this plugin's session over: stopping")),
        "{:?}",
        first.lines()
    );
    let second = client("python 2", &python, true, false);
    eventually("the second Python client to wait", || {
        second
            .lines()
            .iter()
            .any(|l| l.contains("another client holds this plugin's session; waiting"))
    })
    .await;
    taker.signal(libc::SIGKILL);
    eventually("the second Python client to register", || {
        second.lines().iter().any(|l| l.contains("registered echo"))
    })
    .await;
    let alice = node(1);
    host.ports().add_peer(alice, [1; 32], "alice");
    host.inject_payload(alice, "echo.ping", "turn").await;
    host.ports()
        .wait_until(WAIT, |calls| {
            pongs_to(calls, alice)
                .into_iter()
                .find(|p| p.contains("turn"))
        })
        .await
        .unwrap();
    host.shutdown().await;
}

/// The Python module's effects-once hook: the Python counter stores its
/// count with each event's position and reports it (`applied`); 2,000 hits
/// with a SIGKILL while events are handled but not acked count 2,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_counter_sees_each_hit_once_across_a_sigkill() {
    init_logging();
    let Some(python) = python().await else { return };
    let dir = temp_dir();
    let mut config = SidecarConfig::spawn(
        "counter",
        ["counter.hit", "counter.get"],
        dir.path().join("sock"),
        CommandSpec::new(&python).arg(python_dir().join("counter_sidecar.py")),
    );
    config.stuck_timeout = None;
    config.sandbox.read_paths = python_read_paths(&python);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let file = dir.path().join("plugins/counter/count");
    count_once_across_sigkill(&host, &file, 2_000).await;
    host.shutdown().await;
}

/// Runs the conformance kit on `command`, whose sandbox may read
/// `read_paths`, and asserts that every scenario passes.
async fn passes_the_kit(language: &str, read_paths: Vec<PathBuf>, command: &[PathBuf]) {
    let mut args = Vec::new();
    for path in read_paths {
        args.push("--read-path".to_owned());
        args.push(path.display().to_string());
    }
    args.push("--".into());
    args.extend(command.iter().map(|c| c.display().to_string()));
    let out = tokio::process::Command::new(example("pim-sidecar-conformance"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running the kit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("10 passed, 0 failed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "figure: conformance, {language} echo: {}",
        stdout.lines().last().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_echo_passes_the_conformance_kit() {
    init_logging();
    let Some(python) = python().await else { return };
    let script = python_dir().join("echo_sidecar.py");
    passes_the_kit("Python", python_read_paths(&python), &[python, script]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_echo_answers_by_name() {
    init_logging();
    let Some(node) = node_js() else { return };
    echo_answers_by_name(Echo::Node(node)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_echo_resumes_after_a_crash() {
    init_logging();
    let Some(node) = node_js() else { return };
    resumes_after_a_crash(Echo::Node(node)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_echo_passes_the_conformance_kit() {
    init_logging();
    let Some(node) = node_js() else { return };
    let script = node_dir().join("echo_sidecar.js");
    passes_the_kit("Node.js", node_read_paths(), &[node, script]).await;
}

/// Runs `script` with `program` (it prints `NAME value` for each of
/// `constants`, in order) and checks that each value is the host's.
async fn constants_match(
    program: &std::path::Path,
    args: Vec<String>,
    module: &str,
    constants: &[(&str, u64)],
) {
    let (ok, stdout, stderr) = run_tool(program, &args).await;
    assert!(
        ok,
        "reading {module}'s constants failed:\n{stdout}\n{stderr}"
    );
    let found: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let expected: Vec<(String, String)> = constants
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.to_string()))
        .collect();
    assert_eq!(
        found, expected,
        "{module}'s constants (left) against the host's (right)"
    );
}

/// The Python module repeats the host's wire limits, protocol version and
/// batch size as constants of its own (its pacing of Acks takes a batch of
/// fewer than `FULL_BATCH_EVENTS` for a caught-up stream): each must equal
/// the host's.
#[tokio::test]
async fn the_python_modules_constants_are_the_hosts() {
    use pim_sidecar::proto::{limits, EXIT_REFUSED, PROTOCOL_VERSION};
    let Some(python) = python().await else { return };
    let constants = [
        ("PROTOCOL_VERSION", u64::from(PROTOCOL_VERSION)),
        ("EXIT_REFUSED", u64::from(EXIT_REFUSED)),
        ("NODE_ID_BYTES", limits::NODE_ID_BYTES as u64),
        ("KEY_BYTES", limits::KEY_BYTES as u64),
        ("MAX_KIND_BYTES", limits::MAX_KIND_BYTES as u64),
        ("MAX_BODY_BYTES", limits::MAX_BODY_BYTES as u64),
        ("MAX_MESSAGE_BYTES", limits::MAX_MESSAGE_BYTES as u64),
        ("FULL_BATCH_EVENTS", limits::MAX_BATCH_EVENTS as u64),
    ];
    let script = format!(
        "import sys; sys.path.insert(0, {dir:?}); import pim_sidecar as m\n\
         for name in {list:?}: print(name, getattr(m, name))",
        dir = python_dir().display().to_string(),
        list = constants.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
    );
    let args = vec!["-c".into(), script];
    constants_match(&python, args, "examples/python/pim_sidecar.py", &constants).await;
}

/// The Node.js module's protocol version, refusal exit code and message
/// bound are the host's.
#[tokio::test]
async fn the_node_modules_constants_are_the_hosts() {
    use pim_sidecar::proto::{limits, EXIT_REFUSED, PROTOCOL_VERSION};
    let Some(node) = node_js() else { return };
    let constants = [
        ("PROTOCOL_VERSION", u64::from(PROTOCOL_VERSION)),
        ("EXIT_REFUSED", u64::from(EXIT_REFUSED)),
        ("MAX_MESSAGE_BYTES", limits::MAX_MESSAGE_BYTES as u64),
    ];
    let script = format!(
        "const m = require({module:?});\n\
         for (const name of {list:?}) console.log(name, String(m[name]));",
        module = node_dir().join("pim_sidecar.js").display().to_string(),
        list = constants.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
    );
    let args = vec!["-e".into(), script];
    constants_match(&node, args, "examples/node/pim_sidecar.js", &constants).await;
}

#[tokio::test]
async fn the_python_modules_own_unit_tests_pass() {
    let Some(python) = python().await else { return };
    let dir = python_dir();
    let args = ["-m", "unittest", "discover", "-v", "-s"]
        .map(String::from)
        .into_iter()
        .chain([dir.display().to_string(), "-p".into(), "test_*.py".into()])
        .collect::<Vec<_>>();
    let (ok, stdout, stderr) = run_tool(&python, &args).await;
    assert!(ok, "python -m unittest failed:\n{stdout}\n{stderr}");
    // unittest reports on stderr; an empty discovery also "passes".
    assert!(
        stderr.contains("Ran 27 tests") && stderr.contains("\nOK"),
        "{stderr}"
    );
}
