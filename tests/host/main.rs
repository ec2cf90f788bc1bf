//! A daemon stand-in for the multi-process tests: it hosts one sidecar
//! through `SidecarPlugin` with the testkit's recording ports, in its own
//! process, so that a test can SIGKILL "the daemon".
//!
//! ```text
//! test-host --dir DIR --name NAME (--spawn PROGRAM | --external)
//!           [--mode PROBE_MODE] [--grace MS] [--term MS]
//! ```
//!
//! Prints `ready <sidecar pid or 0>` once serving, then `sent <kind> <body>`
//! for every payload the sidecar sends directly. Reads commands on stdin:
//! `payload <kind> <body>` (from node 01…01), `shutdown`, and
//! `cancel-exit`: what pim-daemon 0.1.18 does on SIGTERM, cancelling
//! `PluginContext::cancel` and exiting 100 ms later without awaiting any
//! plugin's `shutdown()`. `--mode` is passed to the probe as `PROBE_MODE`
//! (with `PROBE_MARKER=<dir>/plugins/<name>/marker`); `--grace` and `--term` set
//! `shutdown_grace` (default 2000) and `term_grace` (default 2000).

use std::path::PathBuf;
use std::time::Duration;

use pim_core::NodeId;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, SidecarConfig};
use pim_protocol::ControlFrame;
use tokio::io::AsyncBufReadExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut args = std::env::args().skip(1);
    let (mut dir, mut name, mut spawn, mut mode) = (None, None, None, None);
    let (mut grace, mut term) = (2000, 2000);
    let millis = |arg: Option<String>| -> anyhow::Result<u64> {
        Ok(arg
            .ok_or_else(|| anyhow::anyhow!("a duration in ms"))?
            .parse()?)
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--name" => name = args.next(),
            "--spawn" => spawn = args.next().map(PathBuf::from),
            "--external" => {}
            "--mode" => mode = args.next(),
            "--grace" => grace = millis(args.next())?,
            "--term" => term = millis(args.next())?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("--dir is required"))?;
    let name = name.ok_or_else(|| anyhow::anyhow!("--name is required"))?;
    let kinds = [format!("{name}.cmd"), format!("{name}.seq")];
    let mut config = match spawn {
        Some(program) => {
            let mut command = CommandSpec::new(program);
            if let Some(mode) = mode {
                command = command
                    .env("PROBE_MODE", mode)
                    // In the plugin's own data directory: the only one its
                    // sandbox lets it write.
                    .env(
                        "PROBE_MARKER",
                        dir.join("plugins").join(&name).join("marker"),
                    );
            }
            SidecarConfig::spawn(&name, kinds, dir.join("sock"), command)
        }
        None => SidecarConfig::external(&name, kinds, dir.join("sock")),
    };
    config.shutdown_grace = Duration::from_millis(grace);
    config.term_grace = Duration::from_millis(term);
    let host = FakeHost::start(config, &dir).await?;
    println!("ready {}", host.plugin().pid().unwrap_or(0));
    let ports = host.ports().clone();
    tokio::spawn(async move {
        let mut printed = 0;
        loop {
            let Ok(calls) = ports
                .wait_until(Duration::from_secs(3600), |calls| {
                    (calls.len() > printed).then(|| calls[printed..].to_vec())
                })
                .await
            else {
                continue;
            };
            printed += calls.len();
            for call in calls {
                if let PortCall::SendDirect {
                    frame: ControlFrame::PluginPayload { kind, body },
                    ..
                } = call
                {
                    println!("sent {kind} {}", String::from_utf8_lossy(&body));
                }
            }
        }
    });
    let src = NodeId::from_bytes([1; 16]);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut parts = line.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("payload"), Some(kind), body) => {
                host.inject_payload(src, kind, body.unwrap_or_default().to_owned())
                    .await;
            }
            (Some("shutdown"), _, _) => break,
            (Some("cancel-exit"), _, _) => {
                host.cancel_daemon();
                tokio::time::sleep(Duration::from_millis(100)).await;
                println!("exiting");
                // Return from `main` as pim-daemon does: the runtime and
                // every task and handle in it are dropped. The fake host is
                // not: its drop kills the sidecar (a test kit's clean-up),
                // which a daemon that exits does not do.
                std::mem::forget(host);
                return Ok(());
            }
            _ => eprintln!("unknown command {line:?}"),
        }
    }
    host.shutdown().await;
    println!("stopped");
    Ok(())
}
