//! The probe sidecar used by the integration tests: it exercises every host
//! RPC on command and reports what it saw through `SendDirect`, so a test
//! reads the results from the fake host's recorded port calls.
//!
//! Its name is `PIM_PLUGIN_NAME` (default `probe`); its kinds are
//! `<name>.cmd` (a command in the body, answered with a `<name>.reply`
//! payload sent directly to the payload's source) and `<name>.seq`
//! (answered with `<name>.seen` carrying `<pid> <body>`, so the handled
//! order and the handling process are visible; a `.seq` body `which` is
//! answered with `seq <seq> of <host instance>` from `EventInfo::current`,
//! and a body `retry <n>` is refused with `Retry` `n` times before it is
//! answered). Commands: `lookup <hex
//! node>`, `direct <hex node>`, `routed <hex node>`, `seed`, `watch`,
//! `send <kind>` (a payload of that kind to the source), `goodbye`, `env`
//! (the names of its environment variables), `datadir` (its
//! `Context::data_dir`), `socket` (its `PIM_PLUGIN_SOCKET`).
//!
//! `PROBE_MODE` changes its behaviour for the supervision tests:
//! `crash` exits with status 3 at once; `stall-once` never returns from the
//! handler of a `<name>.seq` payload whose body is `stall`, in the first
//! process only (it creates `PROBE_MARKER`); `stubborn` ignores SIGTERM and
//! stalls on every `stall` payload; `slow-shutdown` takes 1.5 s to clean up
//! in `shutdown` and then creates `PROBE_MARKER` (clean-up finished).

use std::process::ExitCode;

use pim_sidecar::{
    async_trait, Bytes, Context, ControlFrame, HostClient, NodeId, Sidecar, WatchEvent,
};
use tokio::sync::OnceCell;

struct Probe {
    name: &'static str,
    kinds: [&'static str; 2],
    mode: String,
    host: OnceCell<HostClient>,
    data_dir: OnceCell<std::path::PathBuf>,
    /// Attempts at the `retry <n>` payload in hand.
    attempts: std::sync::atomic::AtomicU32,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_node(hex_node: &str) -> anyhow::Result<NodeId> {
    let bytes: Vec<u8> = (0..hex_node.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex_node.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()?;
    let raw: [u8; 16] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a node is 32 hex digits"))?;
    Ok(NodeId::from_bytes(raw))
}

fn payload(kind: String, body: String) -> ControlFrame {
    ControlFrame::PluginPayload {
        kind,
        body: body.into(),
    }
}

impl Probe {
    fn host(&self) -> &HostClient {
        self.host.get().expect("start runs before any payload")
    }

    fn kind(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    async fn command(&self, src: NodeId, cmd: &str) -> anyhow::Result<String> {
        let host = self.host();
        let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        Ok(match verb {
            "lookup" => {
                let node = parse_node(arg)?;
                let key = host.lookup_x25519(&node).await?;
                let name = host.lookup_name(&node).await?;
                format!(
                    "lookup x25519={} name={}",
                    key.map_or("none".into(), |k| hex(&k)),
                    name.unwrap_or_else(|| "none".into())
                )
            }
            "direct" => {
                let frame = payload(self.kind("out"), "direct".into());
                host.send_direct(parse_node(arg)?, frame).await?;
                "direct ok".into()
            }
            "routed" => {
                let frame = payload(self.kind("out"), "routed".into());
                let attempted = host.send_routed(parse_node(arg)?, frame).await?;
                format!("routed attempted={attempted}")
            }
            "send" => match host.send_direct(src, payload(arg.into(), "x".into())).await {
                Ok(()) => "send ok".into(),
                Err(e) => format!("send error {:?}: {e}", e.code()),
            },
            "goodbye" => {
                let frame = ControlFrame::Goodbye {
                    departing_id: src,
                    reason: 1,
                };
                match host.send_direct(src, frame).await {
                    Ok(()) => "goodbye ok".into(),
                    Err(e) => format!("goodbye error {:?}: {e}", e.code()),
                }
            }
            "socket" => format!(
                "socket {}",
                std::env::var("PIM_PLUGIN_SOCKET").unwrap_or_default()
            ),
            "datadir" => format!(
                "datadir {}",
                self.data_dir
                    .get()
                    .map_or("none".into(), |d| d.display().to_string())
            ),
            "env" => {
                let mut names: Vec<String> = std::env::vars_os()
                    .map(|(k, _)| k.to_string_lossy().into_owned())
                    .collect();
                names.sort();
                format!("env {}", names.join(","))
            }
            "seed" => match host.signing_seed().await {
                Ok(seed) => format!("seed {}", hex(&seed)),
                Err(e) => format!("seed error {:?}", e.code()),
            },
            "watch" => {
                let mut watch = host.watch().await?;
                let host = host.clone();
                let kind = self.kind("reply");
                tokio::spawn(async move {
                    while let Ok(Some(ev)) = watch.next().await {
                        let text = match ev {
                            WatchEvent::Peer(pim_sidecar::PeerDirectoryEvent::Seen {
                                node_id,
                                name,
                                ..
                            }) => format!("watched seen {} {name}", hex(node_id.as_bytes())),
                            WatchEvent::Peer(pim_sidecar::PeerDirectoryEvent::Forgotten {
                                node_id,
                            }) => format!("watched forgotten {}", hex(node_id.as_bytes())),
                            WatchEvent::Lagged { missed } => format!("watched lagged {missed}"),
                            other => format!("watched {other:?}"),
                        };
                        let _ = host.send_direct(src, payload(kind.clone(), text)).await;
                    }
                });
                "watching".into()
            }
            other => format!("unknown command {other}"),
        })
    }

    /// Whether this payload should hang the handler, per `PROBE_MODE`.
    fn should_stall(&self, body: &str) -> bool {
        if body != "stall" {
            return false;
        }
        match self.mode.as_str() {
            "stubborn" => true,
            "stall-once" => {
                let marker =
                    std::env::var_os("PROBE_MARKER").expect("stall-once needs PROBE_MARKER");
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(marker)
                    .is_ok()
            }
            _ => false,
        }
    }
}

#[async_trait]
impl Sidecar for Probe {
    fn name(&self) -> &str {
        self.name
    }

    fn payload_kinds(&self) -> &[&str] {
        &self.kinds
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let _ = self.data_dir.set(ctx.data_dir);
        let _ = self.host.set(ctx.host);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        let text = String::from_utf8_lossy(&body).into_owned();
        let reply = if kind == self.kinds[1] {
            if self.should_stall(&text) {
                tracing::warn!("stalling on purpose");
                std::future::pending::<()>().await;
            }
            if let Some(n) = text.strip_prefix("retry ") {
                // Not handled, `n` times: the SDK hands it back each time.
                let n: u32 = n.parse()?;
                let tried = self
                    .attempts
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if tried < n {
                    return Err(pim_sidecar::Retry::new(format!("attempt {}", tried + 1)).into());
                }
                self.attempts.store(0, std::sync::atomic::Ordering::SeqCst);
            }
            let event = pim_sidecar::EventInfo::current().map_or("no event".into(), |e| {
                format!("seq {} of {}", e.seq, e.host_instance)
            });
            let text = if text == "which" { event } else { text };
            payload(self.kind("seen"), format!("{} {text}", std::process::id()))
        } else {
            payload(self.kind("reply"), self.command(src, &text).await?)
        };
        self.host().send_direct(src, reply).await?;
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        let frame = payload(self.kind("forgotten"), hex(peer.as_bytes()));
        let _ = self.host().send_direct(peer, frame).await;
    }

    async fn shutdown(&self) {
        if self.mode == "slow-shutdown" {
            tracing::info!("probe cleaning up slowly");
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            if let Some(marker) = std::env::var_os("PROBE_MARKER") {
                let _ = std::fs::write(marker, "clean-up finished");
            }
            tracing::info!("probe clean-up finished");
        }
    }
}

fn main() -> ExitCode {
    let mode = std::env::var("PROBE_MODE").unwrap_or_default();
    if mode == "crash" {
        eprintln!("ERROR probe crashing on purpose");
        return ExitCode::from(3);
    }
    let name: &'static str = Box::leak(
        std::env::var("PIM_PLUGIN_NAME")
            .unwrap_or_else(|_| "probe".into())
            .into_boxed_str(),
    );
    eprintln!(r#"{{"level":"warn","message":"probe {name} says hello in JSON"}}"#);
    if mode == "stubborn" {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
        eprintln!("WARN probe ignores SIGTERM");
    }
    let kinds = [
        &*Box::leak(format!("{name}.cmd").into_boxed_str()),
        &*Box::leak(format!("{name}.seq").into_boxed_str()),
    ];
    pim_sidecar::run(Probe {
        name,
        kinds,
        mode,
        host: OnceCell::new(),
        data_dir: OnceCell::new(),
        attempts: Default::default(),
    })
}
