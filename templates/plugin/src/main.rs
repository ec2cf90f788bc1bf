//! A pim-daemon plugin in a process of its own: it answers an `echo.ping`
//! from a peer with an `echo.pong` routed back, greeting the peer by the
//! name the daemon's directory gives.

use std::process::ExitCode;
use std::sync::OnceLock;

use pim_sidecar::{anyhow, async_trait, Bytes, Context, ControlFrame, HostClient, NodeId, Sidecar};

#[derive(Default)]
struct Echo {
    host: OnceLock<HostClient>,
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
        let Some(host) = self.host.get() else {
            anyhow::bail!("a payload before start");
        };
        if kind == "echo.ping" {
            let name = host.lookup_name(&src).await?;
            let name = name.as_deref().unwrap_or("stranger");
            let pong = ControlFrame::PluginPayload {
                kind: "echo.pong".into(),
                body: format!("hello {name}, you said: {}", String::from_utf8_lossy(&body)).into(),
            };
            host.send_routed(src, pong).await?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    pim_sidecar::run(Echo::default())
}
