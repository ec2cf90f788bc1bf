//! The echo sidecar: the smallest useful pim-daemon plugin out of process.
//!
//! It claims `echo.ping` and `echo.pong`. A ping from a peer is answered
//! with a pong routed back to it, greeting the peer by the friendly name the
//! daemon's directory gives (`LookupName`); a pong is logged at DEBUG (a line per payload only when `RUST_LOG` asks for it).
//!
//! With `ECHO_CONTROL` set to a path, it also serves a control socket there,
//! one command per line, so a test can start a ping from this node:
//!
//! ```text
//! ping <peer node id, 32 hex digits> <text>  -> pong <round trip in µs> <the pong's body> | error <why>
//! ```
//!
//! The daemon spawns it (see `demo-host`); to run it by hand against a live
//! host, set `PIM_PLUGIN_SOCKET` and `PIM_PLUGIN_TOKEN_FILE`:
//!
//! ```text
//! PIM_PLUGIN_SOCKET=/run/pim/plugins/echo.sock PIM_PLUGIN_TOKEN_FILE=/run/pim/plugins/echo.token \
//!     cargo run -p pim-sidecar-examples --bin echo-sidecar
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pim_sidecar::{async_trait, Bytes, Context, ControlFrame, NodeId, Sidecar};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, OnceCell};

#[derive(Default)]
struct Echo {
    host: OnceCell<pim_sidecar::HostClient>,
    /// Pongs awaited by control-socket pings, by the peer pinged.
    awaited: Arc<Mutex<HashMap<NodeId, oneshot::Sender<Bytes>>>>,
}

impl Echo {
    /// Serves `ECHO_CONTROL`'s socket, if set.
    fn serve_control(&self, host: pim_sidecar::HostClient) -> anyhow::Result<()> {
        let Some(path) = std::env::var_os("ECHO_CONTROL") else {
            return Ok(());
        };
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).map_err(|e| {
            anyhow::anyhow!(
                "binding the control socket {} (ECHO_CONTROL): {e}",
                std::path::Path::new(&path).display()
            )
        })?;
        let awaited = self.awaited.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (host, awaited) = (host.clone(), awaited.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = ping(&host, &awaited, line.trim())
                            .await
                            .unwrap_or_else(|e| format!("error {e:#}"));
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
}

/// `ping <node> <text>`: routes an `echo.ping` and waits for the pong.
async fn ping(
    host: &pim_sidecar::HostClient,
    awaited: &Mutex<HashMap<NodeId, oneshot::Sender<Bytes>>>,
    line: &str,
) -> anyhow::Result<String> {
    let mut words = line.splitn(3, ' ');
    anyhow::ensure!(
        words.next() == Some("ping"),
        "unknown command; try: ping <node> <text>"
    );
    let node: NodeId = words.next().unwrap_or_default().parse()?;
    let text = words.next().unwrap_or_default().to_owned();
    let (tx, rx) = oneshot::channel();
    awaited
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(node, tx);
    let started = Instant::now();
    let frame = ControlFrame::PluginPayload {
        kind: "echo.ping".into(),
        body: text.into(),
    };
    anyhow::ensure!(host.send_routed(node, frame).await?, "no route to {node}");
    let body = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| anyhow::anyhow!("no pong within 10 s"))??;
    Ok(format!(
        "pong {} {}",
        started.elapsed().as_micros(),
        String::from_utf8_lossy(&body)
    ))
}

#[async_trait]
impl Sidecar for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn payload_kinds(&self) -> &[&str] {
        &["echo.ping", "echo.pong"]
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        self.serve_control(ctx.host.clone())?;
        let _ = self.host.set(ctx.host);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        let host = self.host.get().expect("start runs before any payload");
        let text = String::from_utf8_lossy(&body);
        match kind {
            "echo.ping" => {
                let name = host.lookup_name(&src).await?;
                let name = name.as_deref().unwrap_or("stranger");
                // A line per payload only when asked for (RUST_LOG=debug):
                // at the default level a busy plugin would spend more time
                // logging than echoing.
                tracing::debug!("ping from {name} ({src}): {text}");
                let pong = ControlFrame::PluginPayload {
                    kind: "echo.pong".into(),
                    body: format!("hello {name}, you said: {text}").into(),
                };
                let attempted = host.send_routed(src, pong).await?;
                tracing::debug!("pong to {name}: routed={attempted}");
            }
            _ => {
                tracing::debug!("pong from {src}: {text}");
                let waiter = self
                    .awaited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&src);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(body);
                }
            }
        }
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        tracing::info!("peer forgotten: {peer}");
    }
}

fn main() -> ExitCode {
    pim_sidecar::run(Echo::default())
}
