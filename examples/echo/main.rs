//! The echo sidecar: the smallest useful pim-daemon plugin out of process.
//!
//! It claims `echo.ping` and `echo.pong`. A ping from a peer is answered
//! with a pong routed back to it, greeting the peer by the friendly name the
//! daemon's directory gives (`LookupName`); a pong is logged.
//!
//! The daemon spawns it (see `demo-host`); to run it by hand against a live
//! host, set `PIM_PLUGIN_SOCKET` and `PIM_PLUGIN_TOKEN_FILE`:
//!
//! ```text
//! PIM_PLUGIN_SOCKET=/run/pim/plugins/echo.sock PIM_PLUGIN_TOKEN_FILE=/run/pim/plugins/echo.token \
//!     cargo run -p pim-sidecar-examples --bin echo-sidecar
//! ```

use std::process::ExitCode;

use pim_sidecar::{async_trait, Bytes, Context, ControlFrame, NodeId, Sidecar};
use tokio::sync::OnceCell;

#[derive(Default)]
struct Echo {
    host: OnceCell<pim_sidecar::HostClient>,
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
                tracing::info!("ping from {name} ({src}): {text}");
                let pong = ControlFrame::PluginPayload {
                    kind: "echo.pong".into(),
                    body: format!("hello {name}, you said: {text}").into(),
                };
                let attempted = host.send_routed(src, pong).await?;
                tracing::info!("pong to {name}: routed={attempted}");
            }
            _ => tracing::info!("pong from {src}: {text}"),
        }
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        tracing::info!("peer forgotten: {peer}");
    }
}

/// Runs the echo sidecar (`pub(crate)`: the benchmark compiles this file in
/// too, to time its start).
pub(crate) fn main() -> ExitCode {
    pim_sidecar::run(Echo::default())
}
