//! `pim_messaging::MessagingPlugin` (crates.io `pim-messaging`), unchanged,
//! running out of process.
//!
//! The plugin is built from the host-backed `PluginContext` exactly as the
//! daemon builds it in process (`MessagingService::open` with the ports),
//! and stores messages in `messages.db` under the data directory the host
//! gives. It needs the SIGNING_SEED grant (ECIES decryption).
//!
//! The daemon's JSON-RPC is not part of the plugin trait, so this sidecar
//! offers a small control socket instead, `<data_dir>/messaging.ctl`, one
//! command per line:
//!
//! ```text
//! send <peer node id, 32 hex digits> <text>   -> ok <message id> | error <why>
//! history <peer node id>                       -> one line per message, newest first:
//!                                                 <id> <direction> <status> <body>, then "end"
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use pim_core::NodeId;
use pim_messaging::{MessagingPlugin, MessagingService, KIND_ACK, KIND_MESSAGE};
use pim_sidecar::DaemonPluginSidecar;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

static KINDS: &[&str] = &[KIND_MESSAGE, KIND_ACK];

fn parse_node(hex: &str) -> anyhow::Result<NodeId> {
    anyhow::ensure!(
        hex.len() == 32,
        "a node id is 32 hex digits, got {}",
        hex.len()
    );
    let mut raw = [0u8; 16];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(NodeId::from_bytes(raw))
}

async fn answer(service: &MessagingService, line: &str) -> String {
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let result = async {
        match verb {
            "send" => {
                let (peer, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let record = service.send(parse_node(peer)?, text.to_owned()).await?;
                Ok(format!("ok {}", record.id))
            }
            "history" => {
                let peer = pim_messaging::hex_node_id(&parse_node(rest)?);
                let (records, _) = service.storage().history(&peer, None, 100)?;
                let mut out = String::new();
                for r in records {
                    let direction = serde_json::to_value(r.direction)?;
                    let status = serde_json::to_value(r.status)?;
                    out.push_str(&format!(
                        "{} {} {} {}\n",
                        r.id,
                        direction.as_str().unwrap_or("?"),
                        status.as_str().unwrap_or("?"),
                        r.body
                    ));
                }
                out.push_str("end");
                Ok(out)
            }
            other => anyhow::bail!("unknown command `{other}`; try send or history"),
        }
    }
    .await;
    result.unwrap_or_else(|e: anyhow::Error| format!("error {e:#}"))
}

fn serve_control(path: &Path, service: Arc<MessagingService>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = answer(&service, line.trim()).await;
                    if write
                        .write_all(format!("{reply}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

fn main() -> ExitCode {
    let sidecar = DaemonPluginSidecar::new("messaging", KINDS, |ctx| {
        let service = Arc::new(MessagingService::open(
            ctx.data_dir.join("messages.db"),
            ctx.peers.clone(),
            ctx.control.clone(),
            ctx.identity.clone(),
        )?);
        serve_control(&ctx.data_dir.join("messaging.ctl"), service.clone())?;
        Ok(MessagingPlugin::new(service))
    })
    .requires_signing_seed(true);
    pim_sidecar::run_daemon_plugin(sidecar)
}
