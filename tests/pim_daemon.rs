//! Sidecars in the real pim-daemon (crates.io 0.1.18 with
//! `integrations/pim-daemon/`'s patch, built by `integrations/pim-daemon/build.sh`,
//! which `tests/run.sh` runs and whose output directory it names in
//! `PIM_DAEMON_BIN_DIR`).
//!
//! Two daemons, alpha and bravo, run as root in a network namespace of
//! their own with only `lo` in it, each in a mount namespace of its own with
//! a private tmpfs on `/run` (the daemon always writes `/run/pim.stats`);
//! bravo connects to alpha over TCP on 127.0.0.1. Both host the echo and
//! messaging sidecars; alpha also a sidecar with a slow clean-up and one
//! whose binary is missing.
//!
//! Run alone, with its figures: `cargo test -p pim-sidecar-tests --test
//! pim_daemon -- --nocapture` (after `integrations/pim-daemon/build.sh`).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where the patched daemons are, or `None` (with the reason printed) when
/// this machine cannot run them; under `CI=true` that is a failure.
fn daemons() -> Option<PathBuf> {
    let missing = |why: String| {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, but the real-daemon test cannot run: {why}"
        );
        eprintln!("SKIPPED: {why}");
        None
    };
    let Some(dir) = std::env::var_os("PIM_DAEMON_BIN_DIR").map(PathBuf::from) else {
        return missing(
            "PIM_DAEMON_BIN_DIR is not set (tests/run.sh builds the patched pim-daemon and sets it; or run integrations/pim-daemon/build.sh and set it to the directory it prints)".into(),
        );
    };
    if !dir.join("pim-daemon").is_file() || !dir.join("pim-daemon-nomsg").is_file() {
        return missing(format!(
            "{} has no pim-daemon and pim-daemon-nomsg (run integrations/pim-daemon/build.sh)",
            dir.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return missing("pim-daemon needs root (it creates a TUN device)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return missing("pim-daemon needs /dev/net/tun".into());
    }
    for tool in ["unshare", "nsenter", "ip", "mount"] {
        if !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(tool).is_file())
        {
            return missing(format!("`{tool}` is not on PATH (util-linux, iproute2)"));
        }
    }
    Some(dir)
}

/// A network namespace with only `lo`, up, held by a sleeping process.
struct Netns {
    holder: ChildProcess,
}

impl Netns {
    async fn new() -> Self {
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && echo ready && exec sleep 600",
        ]);
        let holder = ChildProcess::spawn("netns holder", cmd);
        holder.wait_line("ready", |l| l == "ready").await;
        Self { holder }
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.pid())
    }
}

/// One real daemon's files.
struct Node {
    name: &'static str,
    dir: PathBuf,
}

impl Node {
    fn new(root: &Path, name: &'static str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        Self { name, dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn rpc(&self) -> PathBuf {
        self.dir.join("rpc.sock")
    }

    fn sockets(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// In the echo plugin's own data directory: its sandbox lets it make
    /// a socket nowhere else.
    fn echo_control(&self) -> PathBuf {
        self.data().join("plugins/echo/echo.ctl")
    }

    /// Writes the daemon's config; `peer` is the port of a daemon to dial.
    fn write_config(&self, port: u16, peer: Option<u16>, sidecars_in_config: bool) -> PathBuf {
        let mut config = format!(
            r#"[node]
name = "{name}"
data_dir = "{data}"

[interface]
name = "pim-{name}"

[discovery]
enabled = false

[transport]
listen_port = {port}

[security]
key_file = "{dir}/node.key"
trust_store_file = "{dir}/trust.toml"
"#,
            name = self.name,
            data = self.data().display(),
            dir = self.dir.display(),
        );
        if sidecars_in_config {
            config.push_str("\n[plugins]\nsidecars_file = \"sidecars.toml\"\n");
        }
        if let Some(peer) = peer {
            config.push_str(&format!(
                "\n[[peers]]\nmechanism = \"tcp\"\naddress = \"127.0.0.1:{peer}\"\n"
            ));
        }
        let path = self.dir.join("pim.toml");
        std::fs::write(&path, config).unwrap();
        path
    }

    fn write_sidecars(&self, text: &str) -> PathBuf {
        let path = self.dir.join("sidecars.toml");
        std::fs::write(&path, format!("socket_dir = \"sock\"\n{text}")).unwrap();
        path
    }

    /// Starts `daemon` in `netns`, in a mount namespace of its own with a
    /// private `/run`.
    fn start(
        &self,
        netns: &Netns,
        daemon: &Path,
        config: &Path,
        env_file: Option<&Path>,
    ) -> ChildProcess {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.path()))
            .args(["--", "unshare", "--mount", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 tmpfs /run && exec \"$0\" \"$@\"")
            .arg(daemon)
            .arg(config)
            .arg(self.dir.join("pim.pid"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            // The sidecars' DEBUG lines too: the test reads the echo's.
            .env("RUST_LOG", "info,pim_sidecar::output=debug")
            .env("NO_COLOR", "1")
            .env("PIM_DATA_DIR", self.data())
            .env("PIM_RPC_SOCKET", self.rpc());
        if let Some(file) = env_file {
            cmd.env("PIM_SIDECARS_FILE", file);
        }
        ChildProcess::spawn(self.name, cmd)
    }
}

/// One JSON-RPC call to a daemon; the result, or the error object.
async fn rpc(node: &Node, method: &str, params: serde_json::Value) -> serde_json::Value {
    eventually("the daemon's JSON-RPC socket", || node.rpc().exists()).await;
    let call = async {
        let stream = tokio::net::UnixStream::connect(node.rpc()).await.unwrap();
        let (read, mut write) = stream.into_split();
        // docs/RPC.md of pim-daemon: rpc.hello comes first.
        let hello = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "rpc.hello",
            "params": {"client": "pim-sidecar-tests", "rpc_version": 1}});
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        write
            .write_all(format!("{hello}\n{request}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            if value.get("id") == Some(&serde_json::json!(0)) && value.get("error").is_some() {
                panic!("rpc.hello refused by {}: {value}", node.name);
            }
            if value.get("id") == Some(&serde_json::json!(1)) {
                return value
                    .get("result")
                    .or_else(|| value.get("error"))
                    .cloned()
                    .unwrap_or_default();
            }
        }
        panic!(
            "{} closed the JSON-RPC connection during {method}",
            node.name
        )
    };
    tokio::time::timeout(WAIT, call)
        .await
        .unwrap_or_else(|_| panic!("{method} on {} took over {WAIT:?}", node.name))
}

/// The pids the daemon logged for its spawned sidecars, by plugin.
fn spawned_pids(daemon: &ChildProcess, plugin: &str) -> Vec<u32> {
    daemon
        .stdout()
        .iter()
        .filter(|l| of_plugin(l, plugin) && l.contains("sidecar spawned"))
        .filter_map(|l| {
            let rest = &l[l.find("pid=")? + 4..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Watchdog processes (`/bin/sh -c … pim-watchdog …`) whose parent is `pid`.
fn watchdogs_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let parent = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            parent == Some(pid)
                && cmdline.split(|b| *b == 0).any(|arg| arg == b"pim-watchdog")
                && process_exists(*p)
        })
        .collect()
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn echo_sidecar(node: &Node, grace: &str, term: &str) -> String {
    format!(
        r#"
[[sidecar]]
name = "echo"
payload_kinds = ["echo.ping", "echo.pong"]
command = ["{bin}"]
env = {{ ECHO_CONTROL = "{ctl}", RUST_LOG = "info,echo_sidecar=debug" }}
shutdown_grace = "{grace}"
term_grace = "{term}"
"#,
        bin = echo_bin().display(),
        ctl = node.echo_control().display(),
    )
}

/// Whether a daemon log line is `plugin`'s: in its span, or with its field.
fn of_plugin(line: &str, plugin: &str) -> bool {
    [
        format!("{{plugin={plugin}}}"),
        format!("{{plugin=\"{plugin}\"}}"),
        format!("plugin={plugin} "),
        format!("plugin=\"{plugin}\""),
    ]
    .iter()
    .any(|p| line.contains(p.as_str()))
}

fn messaging_sidecar() -> String {
    format!(
        r#"
[[sidecar]]
name = "messaging"
payload_kinds = ["{msg}", "{ack}"]
command = ["{bin}"]
env = {{ RUST_LOG = "info" }}
grants = ["signing_seed"]
shutdown_grace = "2s"
term_grace = "1s"
"#,
        msg = pim_messaging::KIND_MESSAGE,
        ack = pim_messaging::KIND_ACK,
        bin = example("messaging-sidecar").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_run_in_two_real_daemons() {
    init_logging();
    let Some(bins) = daemons() else { return };
    let daemon = bins.join("pim-daemon-nomsg");
    let dir = temp_dir();
    let netns = Netns::new().await;

    // alpha: echo, messaging, a slow clean-up, and a binary that is missing.
    let alpha = Node::new(dir.path(), "alpha");
    alpha.write_sidecars(&format!(
        "{}{}{}",
        echo_sidecar(&alpha, "3s", "1s"),
        messaging_sidecar(),
        format_args!(
            r#"
[[sidecar]]
name = "slow"
payload_kinds = ["slow.cmd", "slow.seq"]
command = ["{probe}"]
env = {{ PROBE_MODE = "slow-shutdown", PROBE_MARKER = "{marker}" }}
shutdown_grace = "5s"
term_grace = "1s"

[[sidecar]]
name = "ghost"
payload_kinds = ["ghost.boo"]
command = ["{ghost}"]
"#,
            probe = probe_bin().display(),
            marker = alpha
                .data()
                .join("plugins/slow/slow-cleanup-finished")
                .display(),
            ghost = dir.path().join("no-such-sidecar").display(),
        )
    ));
    // alpha names its sidecars file in its config, bravo in its environment.
    let alpha_config = alpha.write_config(9100, None, true);
    let mut alpha_daemon = alpha.start(&netns, &daemon, &alpha_config, None);
    // Serving JSON-RPC means alpha listens and its plugins are started.
    let alpha_id = rpc(&alpha, "status", serde_json::json!({})).await["node_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let bravo = Node::new(dir.path(), "bravo");
    let bravo_sidecars = bravo.write_sidecars(&format!(
        "{}{}",
        echo_sidecar(&bravo, "2s", "1s"),
        messaging_sidecar()
    ));
    let bravo_config = bravo.write_config(9101, Some(9100), false);
    let mut bravo_daemon = bravo.start(&netns, &daemon, &bravo_config, Some(&bravo_sidecars));

    // The ghost's binary is missing: alpha says so once and runs on.
    alpha_daemon
        .wait_line("the ghost marked failed", |l| {
            of_plugin(l, "ghost") && l.contains("plugin marked failed")
        })
        .await;

    let bravo_id = rpc(&bravo, "status", serde_json::json!({})).await["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(alpha_id.len(), 32, "{alpha_id}");

    // Ping -> pong between the two daemons' echo sidecars over the real mesh.
    let started = Instant::now();
    let first = loop {
        let reply = control(&alpha.echo_control(), &format!("ping {bravo_id} hi")).await;
        // bravo's echo greets alpha by the name its daemon's directory gives
        // once the two have exchanged identities (a pong may come first).
        if reply.starts_with("pong ") && reply.ends_with("hello alpha, you said: hi") {
            break reply;
        }
        assert!(
            started.elapsed() < WAIT,
            "no pong naming alpha from bravo within {WAIT:?}; last reply: {reply}"
        );
        if reply.contains("hello stranger") {
            // bravo has a route to alpha but not its name yet: have alpha
            // announce its identity (pim-daemon's own JSON-RPC).
            rpc(
                &alpha,
                "peers.broadcast_identity_now",
                serde_json::json!({}),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("first pong: {first}");
    let mut round_trips = Vec::new();
    for i in 0..20 {
        let reply = control(&alpha.echo_control(), &format!("ping {bravo_id} n{i}")).await;
        let micros: u128 = reply
            .split(' ')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{reply}"));
        assert!(reply.ends_with(&format!("you said: n{i}")), "{reply}");
        round_trips.push(micros);
    }
    println!(
        "figure: ping -> pong between the two daemons' echo sidecars: median {} µs, max {} µs (20 pings)",
        median(round_trips.clone()),
        round_trips.iter().max().unwrap()
    );
    // bravo's echo saw the ping, through its own daemon's log.
    bravo_daemon
        .wait_line("bravo's echo logging the ping", |l| {
            of_plugin(l, "echo") && l.contains("ping from alpha")
        })
        .await;

    // Each plugin has its own data directory, 0700; the daemon's stays its own.
    let own = alpha.data().join("plugins/messaging");
    assert_eq!(
        std::fs::metadata(&own).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // An unchanged MessagingPlugin, out of process, delivers a message.
    let sent = control(
        &own.join("messaging.ctl"),
        &format!("send {bravo_id} across the real mesh"),
    )
    .await;
    assert!(sent.starts_with("ok "), "{sent}");
    let bravo_ctl = bravo.data().join("plugins/messaging/messaging.ctl");
    let started = Instant::now();
    loop {
        let history = control(&bravo_ctl, &format!("history {alpha_id}")).await;
        if history.contains("across the real mesh") {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "bravo never stored the message: {history}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(own.join("messages.db").exists());
    assert!(bravo.data().join("plugins/messaging/messages.db").exists());
    assert!(
        !alpha.data().join("messages.db").exists(),
        "a sidecar wrote into the daemon's own directory"
    );

    // peers.forget over the daemon's JSON-RPC reaches the sidecars.
    let forgot = rpc(
        &alpha,
        "peers.forget",
        serde_json::json!({"node_id": bravo_id}),
    )
    .await;
    assert_eq!(
        forgot["forgot_identity"],
        serde_json::json!(true),
        "{forgot}"
    );
    alpha_daemon
        .wait_line("alpha's echo told of the forgotten peer", |l| {
            of_plugin(l, "echo") && l.contains("peer forgotten")
        })
        .await;

    // SIGTERM: the slow clean-up gets its grace, every socket is removed.
    let slow_pid = spawned_pids(&alpha_daemon, "slow")[0];
    let started = Instant::now();
    alpha_daemon.signal(libc::SIGTERM);
    let status = alpha_daemon.wait().await;
    let shutdown = started.elapsed();
    assert!(status.success(), "alpha exited with {status}");
    assert_eq!(
        std::fs::read_to_string(alpha.data().join("plugins/slow/slow-cleanup-finished"))
            .ok()
            .as_deref(),
        Some("clean-up finished"),
        "the slow sidecar's clean-up was cut short"
    );
    assert!(!process_exists(slow_pid));
    let left: Vec<_> = std::fs::read_dir(alpha.sockets())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "files left in the socket directory: {left:?}"
    );
    for plugin in ["echo", "messaging", "slow"] {
        assert!(
            alpha_daemon
                .stdout()
                .iter()
                .any(|l| l.contains("sidecar plugin stopped") && of_plugin(l, plugin)),
            "no `stopped` line for {plugin}"
        );
    }
    println!(
        "figure: SIGTERM -> alpha exited, its slow sidecar's 1.5 s clean-up done: {} ms",
        shutdown.as_millis()
    );

    // SIGKILL: bravo's sidecars and their watchdogs follow within
    // shutdown_grace + term_grace (2 s + 1 s).
    let mut pids = spawned_pids(&bravo_daemon, "echo");
    pids.extend(spawned_pids(&bravo_daemon, "messaging"));
    assert_eq!(pids.len(), 2, "{pids:?}");
    let mut watched: Vec<u32> = pids.iter().flat_map(|p| watchdogs_of(*p)).collect();
    assert_eq!(watched.len(), 2, "one watchdog per sidecar: {watched:?}");
    watched.extend(&pids);
    let started = Instant::now();
    bravo_daemon.kill().await;
    let bound = Duration::from_secs(3);
    while watched.iter().any(|p| process_exists(*p))
        && started.elapsed() < bound + Duration::from_secs(2)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<_> = watched
        .iter()
        .copied()
        .filter(|p| process_exists(*p))
        .collect();
    println!(
        "figure: SIGKILL of bravo -> its 2 sidecars and 2 watchdogs gone after {} ms (bound {} ms); processes left: {}",
        started.elapsed().as_millis(),
        bound.as_millis(),
        left.len()
    );
    assert!(
        left.is_empty(),
        "processes outlived the SIGKILLed daemon: {left:?}"
    );
    drop(netns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_claimed_twice_stops_the_real_daemon_naming_both_plugins() {
    init_logging();
    let Some(bins) = daemons() else { return };
    let dir = temp_dir();
    let netns = Netns::new().await;
    let node = Node::new(dir.path(), "charlie");
    // The full daemon has the in-process messaging plugin; this sidecar
    // claims its kinds too.
    let sidecars = node.write_sidecars(
        &messaging_sidecar().replace("name = \"messaging\"", "name = \"messaging-sidecar\""),
    );
    let config = node.write_config(9102, None, false);
    let mut daemon = node.start(&netns, &bins.join("pim-daemon"), &config, Some(&sidecars));
    let status = daemon.wait().await;
    assert!(!status.success());
    let lines = daemon.lines();
    assert!(
        lines.iter().any(|l| l.contains(&format!("payload kind `{}` is claimed by both plugin `messaging` and plugin `messaging-sidecar`", pim_messaging::KIND_MESSAGE))),
        "{lines:#?}"
    );
    // Refused before any plugin started: no sidecar was spawned.
    assert!(
        !lines.iter().any(|l| l.contains("sidecar spawned")),
        "{lines:#?}"
    );
    drop(netns);
}
