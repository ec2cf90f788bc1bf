//! The probe sidecar used by the integration tests: it exercises every host
//! RPC on command and reports what it saw through `SendDirect`, so a test
//! reads the results from the fake host's recorded port calls.
//!
//! Kinds: `probe.cmd` (a command in the body, answered with a
//! `probe.reply` payload sent directly to the payload's source) and
//! `probe.seq` (answered with `probe.seen` carrying the same body, so the
//! handled order is visible). Commands: `lookup <hex node>`,
//! `direct <hex node>`, `routed <hex node>`, `seed`, `watch`.

use std::process::ExitCode;

use pim_sidecar::{
    async_trait, Bytes, Context, ControlFrame, HostClient, NodeId, Sidecar, WatchEvent,
};
use tokio::sync::OnceCell;

#[derive(Default)]
struct Probe {
    host: OnceCell<HostClient>,
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

fn payload(kind: &str, body: String) -> ControlFrame {
    ControlFrame::PluginPayload {
        kind: kind.into(),
        body: body.into(),
    }
}

impl Probe {
    fn host(&self) -> &HostClient {
        self.host.get().expect("start runs before any payload")
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
                host.send_direct(parse_node(arg)?, payload("probe.out", "direct".into()))
                    .await?;
                "direct ok".into()
            }
            "routed" => {
                let attempted = host
                    .send_routed(parse_node(arg)?, payload("probe.out", "routed".into()))
                    .await?;
                format!("routed attempted={attempted}")
            }
            "seed" => match host.signing_seed().await {
                Ok(seed) => format!("seed {}", hex(&seed)),
                Err(e) => format!("seed error {:?}", e.code()),
            },
            "watch" => {
                let mut watch = host.watch().await?;
                let host = host.clone();
                tokio::spawn(async move {
                    while let Ok(Some(ev)) = watch.next().await {
                        let text = match ev {
                            WatchEvent::Peer(pim_plugin::PeerDirectoryEvent::Seen {
                                node_id,
                                name,
                                ..
                            }) => format!("watched seen {} {name}", hex(node_id.as_bytes())),
                            WatchEvent::Peer(pim_plugin::PeerDirectoryEvent::Forgotten {
                                node_id,
                            }) => format!("watched forgotten {}", hex(node_id.as_bytes())),
                            WatchEvent::Lagged { missed } => format!("watched lagged {missed}"),
                        };
                        let _ = host.send_direct(src, payload("probe.reply", text)).await;
                    }
                });
                "watching".into()
            }
            other => format!("unknown command {other}"),
        })
    }
}

#[async_trait]
impl Sidecar for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn payload_kinds(&self) -> &[&str] {
        &["probe.cmd", "probe.seq"]
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let _ = self.host.set(ctx.host);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        let text = String::from_utf8_lossy(&body).into_owned();
        let reply = match kind {
            "probe.seq" => payload("probe.seen", text),
            _ => payload("probe.reply", self.command(src, &text).await?),
        };
        self.host().send_direct(src, reply).await?;
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        let _ = self
            .host()
            .send_direct(peer, payload("probe.forgotten", hex(peer.as_bytes())))
            .await;
    }
}

fn main() -> ExitCode {
    pim_sidecar::run(Probe::default())
}
