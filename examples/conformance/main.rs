//! `pim-sidecar-conformance`: checks that a sidecar, in any language, keeps
//! the protocol (docs/PROTOCOL.md), by hosting it through the real bridge
//! and running named scenarios against it.
//!
//! ```text
//! pim-sidecar-conformance [--name echo] [--claims all|<scenario>,…] [--json FILE]
//!                         [--read-path DIR]… -- <command> [args…]
//! ```
//!
//! The sidecar under test is an *echo*: it claims `<name>.ping` and
//! `<name>.pong`, and answers a `<name>.ping` from a peer with a
//! `<name>.pong` sent back to that peer (routed or direct) whose body
//! contains the ping's body. `--claims` names the scenarios the plugin
//! claims to pass (default: all); the others print `not claimed`.
//! `--read-path` adds a directory its sandbox may read (an interpreter's
//! installation). `PIM_CONFORMANCE_LOG=1` prints the host's log, the
//! sidecar's output included, on stderr. One line per scenario, then `N passed, N failed`; the
//! exit status is 1 when any claimed scenario failed, 2 on bad arguments.
//!
//! Scenarios: `register` (registers with the configured name and kinds),
//! `in_order` (100 pings answered in order), `acks` (acks cumulatively up to
//! the last event, never past what it answered), `duplicates` (the host
//! ends its stream and sends 100 handled pings again on the next: it
//! registers again in the same process and answers none twice), `resume` (SIGKILL in the
//! middle of 300 pings: the next process answers every one left, in
//! order), `host_restart` (run on its own, it outlives a host that dies
//! and, with the restarted host's new `host_instance`, handles the new
//! host's events from seq 1 again), `shutdown` (exits 0 on Shutdown within the grace), `refused`
//! (exits 78 when the host refuses its Register, and is not restarted),
//! `takeover` (taken over by another client, it exits 0 and does not take
//! the session back), `unknown_event` (an event of a kind it does not know
//! is skipped and acked, and the events after it are handled).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pim_core::NodeId;
use pim_plugin_bridge::proto::pb;
use pim_plugin_bridge::proto::pb::plugin_session_client::PluginSessionClient;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, EndReason, SidecarConfig};
use pim_protocol::ControlFrame;

/// Every scenario, in the order they run.
const SCENARIOS: &[&str] = &[
    "register",
    "in_order",
    "acks",
    "duplicates",
    "resume",
    "host_restart",
    "shutdown",
    "refused",
    "takeover",
    "unknown_event",
];

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(20);

struct Args {
    name: String,
    claims: Vec<String>,
    json: Option<PathBuf>,
    read_paths: Vec<PathBuf>,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        name: "echo".into(),
        claims: SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
        json: None,
        read_paths: Vec::new(),
        command: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--name" => parsed.name = value("--name")?,
            "--claims" => {
                let v = value("--claims")?;
                if v != "all" {
                    parsed.claims = v.split(',').map(str::to_owned).collect();
                    if let Some(bad) = parsed
                        .claims
                        .iter()
                        .find(|c| !SCENARIOS.contains(&c.as_str()))
                    {
                        return Err(format!(
                            "--claims: no scenario `{bad}` (known: {})",
                            SCENARIOS.join(", ")
                        ));
                    }
                }
            }
            "--json" => parsed.json = Some(value("--json")?.into()),
            "--read-path" => parsed.read_paths.push(value("--read-path")?.into()),
            "--" => {
                parsed.command = args.by_ref().collect();
                break;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if parsed.command.is_empty() {
        return Err("no command: pass the sidecar's command after `--`".into());
    }
    Ok(parsed)
}

/// The result of one scenario.
struct Outcome {
    name: &'static str,
    result: Result<(), String>,
    claimed: bool,
    took: Duration,
}

fn main() -> ExitCode {
    // The host's log, with the sidecar's output in it, on request.
    if std::env::var_os("PIM_CONFORMANCE_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pim-sidecar-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pim-sidecar-conformance: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(run_all(&args));
    let (mut passed, mut failed) = (0, 0);
    for o in &outcomes {
        match (&o.result, o.claimed) {
            (_, false) => println!("{:<10} not claimed", o.name),
            (Ok(()), true) => {
                passed += 1;
                println!("{:<10} pass ({} ms)", o.name, o.took.as_millis());
            }
            (Err(why), true) => {
                failed += 1;
                println!("{:<10} FAIL: {why}", o.name);
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "plugin": args.name,
            "command": args.command,
            "passed": passed,
            "failed": failed,
            "scenarios": outcomes.iter().map(|o| serde_json::json!({
                "name": o.name,
                "result": match (&o.result, o.claimed) {
                    (_, false) => "not claimed",
                    (Ok(()), true) => "pass",
                    (Err(_), true) => "fail",
                },
                "reason": o.result.as_ref().err(),
                "ms": o.took.as_millis() as u64,
            })).collect::<Vec<_>>(),
        });
        if let Err(e) = std::fs::write(path, format!("{report:#}\n")) {
            eprintln!("pim-sidecar-conformance: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn run_all(args: &Args) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for &name in SCENARIOS {
        let claimed = args.claims.iter().any(|c| c == name);
        let started = Instant::now();
        let result = if claimed {
            match tokio::time::timeout(WAIT * 3, scenario(name, args)).await {
                Ok(r) => r,
                Err(_) => Err(format!("did not finish within {:?}", WAIT * 3)),
            }
        } else {
            Ok(())
        };
        outcomes.push(Outcome {
            name,
            result,
            claimed,
            took: started.elapsed(),
        });
    }
    outcomes
}

/// A fresh directory, host configuration and peer for one scenario.
struct Bench {
    dir: tempfile::TempDir,
    ping: String,
    pong: String,
}

impl Bench {
    fn new(args: &Args) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("pim-conformance-")
            .tempdir()
            .map_err(|e| format!("a temp dir: {e}"))?;
        Ok(Self {
            dir,
            ping: format!("{}.ping", args.name),
            pong: format!("{}.pong", args.name),
        })
    }

    fn config(&self, args: &Args, extra_kind: bool) -> SidecarConfig {
        let mut cmd = CommandSpec::new(&args.command[0]);
        cmd.args = args.command[1..].iter().map(Into::into).collect();
        cmd.inherit_env = vec!["RUST_LOG".into()];
        let mut kinds = vec![self.ping.clone(), self.pong.clone()];
        if extra_kind {
            kinds.push(format!("{}.conformance", args.name));
        }
        let mut config = SidecarConfig::spawn(&args.name, kinds, self.dir.path().join("sock"), cmd);
        config.stuck_timeout = None;
        config.required = true;
        config.restart.initial_backoff = Duration::from_millis(50);
        config.sandbox.read_paths = args.read_paths.clone();
        config
    }

    async fn start(&self, args: &Args) -> Result<FakeHost, String> {
        let host = FakeHost::start(self.config(args, false), self.dir.path())
            .await
            .map_err(|e| format!("it did not register: {e:#}"))?;
        host.ports().add_peer(peer(), [7; 32], "conformance");
        Ok(host)
    }
}

fn peer() -> NodeId {
    NodeId::from_bytes([0x5c; 16])
}

/// The numbers `n` of the pongs (bodies containing `ping-<n>.`) sent to the
/// peer, in the order they were sent.
fn pongs(calls: &[PortCall], pong: &str) -> Vec<u32> {
    calls
        .iter()
        .filter_map(|c| match c {
            PortCall::SendRouted {
                dst: to,
                frame: ControlFrame::PluginPayload { kind, body },
                ..
            }
            | PortCall::SendDirect {
                peer: to,
                frame: ControlFrame::PluginPayload { kind, body },
            } if *to == peer() && kind == pong => {
                let text = String::from_utf8_lossy(body);
                let at = text.find("ping-")? + "ping-".len();
                text[at..].split('.').next()?.parse().ok()
            }
            _ => None,
        })
        .collect()
}

async fn send_pings(host: &FakeHost, ping: &str, range: std::ops::Range<u32>) {
    for n in range {
        host.inject_payload(peer(), ping, format!("ping-{n}."))
            .await;
    }
}

/// Waits until `cond` holds, polling.
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {WAIT:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn in_order(seen: &[u32]) -> Result<(), String> {
    match seen.windows(2).find(|w| w[1] < w[0]) {
        Some(w) => Err(format!("pong {} came after pong {}", w[1], w[0])),
        None => Ok(()),
    }
}

async fn scenario(name: &str, args: &Args) -> Result<(), String> {
    let bench = Bench::new(args)?;
    match name {
        "register" => {
            let host = bench.start(args).await?;
            host.shutdown().await;
            Ok(())
        }
        "in_order" | "acks" => {
            let host = bench.start(args).await?;
            send_pings(&host, &bench.ping, 0..100).await;
            let mut worst = None;
            until("100 pongs", || {
                let answered = pongs(&host.ports().calls(), &bench.pong).len() as u64;
                let acked = host.plugin().stats().queue.acked_seq;
                if acked > answered && worst.is_none() {
                    worst = Some((acked, answered));
                }
                answered >= 100
            })
            .await?;
            let seen = pongs(&host.ports().calls(), &bench.pong);
            let result = if name == "in_order" {
                in_order(&seen)
            } else {
                match until("acks up to the last event", || {
                    host.plugin().stats().queue.acked_seq >= 100
                })
                .await
                {
                    Err(e) => Err(e),
                    Ok(()) => match worst {
                        Some((acked, answered)) => Err(format!(
                            "acked seq {acked} while only {answered} pings were answered"
                        )),
                        None => Ok(()),
                    },
                }
            };
            host.shutdown().await;
            result
        }
        "duplicates" => {
            let host = bench.start(args).await?;
            let pid = host.plugin().pid().ok_or("no process")?;
            // The host keeps every event while acks are held, so the next
            // stream sends again the ones already handled.
            host.hold_acks(true);
            send_pings(&host, &bench.ping, 0..100).await;
            until("100 pongs", || {
                pongs(&host.ports().calls(), &bench.pong).len() >= 100
            })
            .await?;
            let replayed_before = host.plugin().stats().queue.replayed;
            if !host.interrupt_stream() {
                host.shutdown().await;
                return Err("no Events stream was open".into());
            }
            let result = async {
                until("a new stream sending the handled events again", || {
                    host.plugin().stats().queue.replayed > replayed_before
                })
                .await
                .map_err(|e| format!("{e} (did it register again after the stream ended?)"))?;
                // One new event after the replayed ones: acked, it covers them.
                host.hold_acks(false);
                send_pings(&host, &bench.ping, 100..101).await;
                until("the events acked after the new stream", || {
                    host.plugin().stats().queue.acked_seq >= 101
                })
                .await?;
                if host.plugin().pid() != Some(pid) {
                    return Err("the process changed: it did not register again by itself".into());
                }
                let mut seen = pongs(&host.ports().calls(), &bench.pong);
                let total = seen.len();
                seen.sort_unstable();
                seen.dedup();
                if total != seen.len() {
                    return Err(format!(
                        "{} pings answered twice: it handled events it had handled already",
                        total - seen.len()
                    ));
                }
                Ok(())
            }
            .await;
            host.shutdown().await;
            result
        }
        "resume" => {
            let host = bench.start(args).await?;
            send_pings(&host, &bench.ping, 0..300).await;
            until("50 pongs", || {
                pongs(&host.ports().calls(), &bench.pong).len() >= 50
            })
            .await?;
            let pid = host.plugin().pid().ok_or("no process")?;
            // SAFETY: kill has no memory-safety preconditions; `pid` is the
            // sidecar this host spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let result = async {
                until("every ping answered after the restart", || {
                    let seen = pongs(&host.ports().calls(), &bench.pong);
                    (0..300).all(|n| seen.contains(&n))
                })
                .await?;
                if host.plugin().stats().restarts == 0 {
                    return Err("it was not restarted".to_owned());
                }
                // Each process answers in order: the new one starts again
                // from where the host resumed (after the last ack), so the
                // pongs go back once, where it took over, and never else.
                let seen = pongs(&host.ports().calls(), &bench.pong);
                let drops = seen.windows(2).filter(|w| w[1] < w[0]).count();
                if drops > 1 {
                    return Err(format!(
                        "pongs out of order {drops} times; a restart explains one"
                    ));
                }
                Ok(())
            }
            .await;
            host.shutdown().await;
            result
        }
        "host_restart" => {
            let external = || {
                SidecarConfig::external(
                    &args.name,
                    [bench.ping.clone(), bench.pong.clone()],
                    bench.dir.path().join("sock"),
                )
            };
            let first = FakeHost::start(external(), bench.dir.path())
                .await
                .map_err(|e| format!("the host: {e:#}"))?;
            first.ports().add_peer(peer(), [7; 32], "conformance");
            // Run on its own, as an operator would start it.
            let mut cmd = tokio::process::Command::new(&args.command[0]);
            cmd.args(&args.command[1..])
                .env_clear()
                .env("PIM_PLUGIN_SOCKET", first.plugin().socket_path())
                .env(
                    "PIM_PLUGIN_TOKEN_FILE",
                    bench.dir.path().join(format!("sock/{}.token", args.name)),
                )
                .env("PIM_PLUGIN_NAME", &args.name)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            if let Some(log) = std::env::var_os("RUST_LOG") {
                cmd.env("RUST_LOG", log);
            }
            if std::env::var_os("PIM_CONFORMANCE_LOG").is_none() {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting {}: {e}", args.command[0]))?;
            let result = async {
                until("it to connect", || first.plugin().stats().connected).await?;
                send_pings(&first, &bench.ping, 0..20).await;
                until("20 pongs from the first host", || {
                    pongs(&first.ports().calls(), &bench.pong).len() >= 20
                })
                .await?;
                first.crash().await;
                let second = FakeHost::start(external(), bench.dir.path())
                    .await
                    .map_err(|e| format!("the restarted host: {e:#}"))?;
                second.ports().add_peer(peer(), [7; 32], "conformance");
                let outcome = async {
                    until("it to connect to the restarted host", || {
                        second.plugin().stats().connected
                    })
                    .await?;
                    // Seq 1 to 20 again, of a new host instance.
                    send_pings(&second, &bench.ping, 20..40).await;
                    until(
                        "20 pongs from the restarted host (seq 1 to 20 of its new instance)",
                        || pongs(&second.ports().calls(), &bench.pong).len() >= 20,
                    )
                    .await
                }
                .await;
                second.shutdown().await;
                outcome
            }
            .await;
            let _ = child.kill().await;
            result
        }
        "shutdown" => {
            let host = bench.start(args).await?;
            host.shutdown().await;
            let end = host.plugin().stats().last_end.ok_or("no end recorded")?;
            if end.status == "exit status 0" {
                Ok(())
            } else {
                Err(format!(
                    "on Shutdown it ended with {} (expected exit status 0 within the grace)",
                    end.status
                ))
            }
        }
        "refused" => {
            // The host is configured with one kind more than the plugin
            // claims, so it refuses the Register.
            let mut config = bench.config(args, true);
            config.required = false;
            let host = FakeHost::start(config, bench.dir.path())
                .await
                .map_err(|e| format!("the host: {e:#}"))?;
            let result = until("the refused process to end", || {
                host.plugin().stats().failed
            })
            .await
            .and_then(|()| {
                let stats = host.plugin().stats();
                let end = stats.last_end.ok_or("no end recorded")?;
                if end.reason != EndReason::Refused {
                    return Err(format!(
                        "refused, it ended with {} (expected exit status 78)",
                        end.reason
                    ));
                }
                if stats.restarts != 0 {
                    return Err(format!("it was started {} more times", stats.restarts));
                }
                Ok(())
            });
            host.shutdown().await;
            result
        }
        "takeover" => {
            let host = bench.start(args).await?;
            let pid = host.plugin().pid().ok_or("no process")?;
            let channel = pim_sidecar::connect_channel(&host.plugin().socket_path())
                .await
                .map_err(|e| format!("connecting to the socket: {e}"))?;
            let mut req = tonic::Request::new(pb::RegisterRequest {
                protocol_version: 1,
                plugin_name: args.name.clone(),
                payload_kinds: vec![bench.ping.clone(), bench.pong.clone()],
                sdk_name: "pim-sidecar-conformance".into(),
                sdk_version: env!("CARGO_PKG_VERSION").into(),
                takeover: true,
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", host.plugin().token())
                    .parse()
                    .map_err(|_| "the token is not valid metadata")?,
            );
            PluginSessionClient::new(channel)
                .register(req)
                .await
                .map_err(|s| format!("the takeover Register failed: {s}"))?;
            let result = until("the taken-over process to end", || {
                host.plugin().pid() != Some(pid)
            })
            .await
            .and_then(|()| {
                let end = host.plugin().stats().last_end.ok_or("no end recorded")?;
                match end.reason {
                    EndReason::Exited { code: 0 } => Ok(()),
                    other => Err(format!(
                        "taken over, it ended with {other} (expected exit 0)"
                    )),
                }
            });
            host.shutdown().await;
            result
        }
        "unknown_event" => {
            let host = bench.start(args).await?;
            let result = async {
                send_pings(&host, &bench.ping, 0..10).await;
                until("10 pongs", || {
                    pongs(&host.ports().calls(), &bench.pong).len() >= 10
                })
                .await?;
                let unknown = host
                    .inject_unknown_event()
                    .ok_or("the host is not running")?;
                send_pings(&host, &bench.ping, 10..20).await;
                until("the pings after the unknown event answered", || {
                    let seen = pongs(&host.ports().calls(), &bench.pong);
                    (10..20).all(|n| seen.contains(&n))
                })
                .await?;
                until("the unknown event acked with the rest", || {
                    host.plugin().stats().queue.acked_seq > unknown
                })
                .await
            }
            .await;
            host.shutdown().await;
            result
        }
        other => Err(format!("no scenario {other}")),
    }
}
