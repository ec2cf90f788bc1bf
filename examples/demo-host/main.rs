//! The demo host: a small simulated mesh whose nodes each host the echo
//! sidecar as a real separate process through `SidecarPlugin`.
//!
//! Three nodes (alice, bob, carol) route frames in memory and dispatch
//! `PluginPayload` frames to their plugins the way pim-daemon does. Alice
//! pings bob and carol; each one's echo sidecar looks alice's name up
//! (`LookupName`) and routes a pong back (`SendRouted`), which alice's own
//! echo sidecar receives. Then alice forgets carol (`on_peer_forgotten`),
//! and every sidecar is shut down in order. It prints what flows and exits 0.
//!
//! The sidecars each node hosts are declared in `sidecars.toml` beside this
//! file (`--config` picks another).
//!
//! ```text
//! ./examples/demo.sh            # builds, runs the scenario, exits 0
//! ./examples/demo.sh --serve    # keeps serving for grpcurl; Ctrl-C or SIGTERM stops
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::file::load_sidecars;
use pim_plugin_bridge::{Launch, SidecarConfig, SidecarPlugin};
use pim_protocol::ControlFrame;
use pim_sidecar_examples::base64;
use pim_sidecar_examples::mesh::{Mesh, MeshEvent};

struct Args {
    serve: bool,
    config: PathBuf,
    bin_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        serve: false,
        config: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/demo-host/sidecars.toml"
        )),
        bin_dir: None,
        dir: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--serve") => args.serve = true,
            Some("--config") => args.config = it.next().map(PathBuf::from).unwrap_or_default(),
            Some("--bin-dir") => args.bin_dir = it.next().map(PathBuf::from),
            Some("--dir") => args.dir = it.next().map(PathBuf::from),
            Some("-h" | "--help") => {
                return Err("usage: demo-host [--serve] [--config FILE] [--bin-dir DIR] [--dir DIR]\n  --serve    keep serving after the scenario (for grpcurl); Ctrl-C stops\n  --config   the sidecars file (default: examples/demo-host/sidecars.toml)\n  --bin-dir  where programs named without a '/' are (default: demo-host's directory)\n  --dir      where sockets and data go (default: a new temporary directory)".into())
            }
            _ => return Err(format!("unknown argument {arg:?}; try --help")),
        }
    }
    Ok(args)
}

/// The sidecars of `args.config`, with bare program names found in the
/// binary directory.
fn sidecars(args: &Args) -> anyhow::Result<Vec<SidecarConfig>> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
    };
    let mut configs = load_sidecars(&args.config)?;
    for config in &mut configs {
        if let Launch::Spawn(cmd) = &mut config.launch {
            if cmd.program.components().count() == 1 {
                cmd.program = bin_dir.join(&cmd.program);
            }
            if !cmd.program.exists() {
                anyhow::bail!(
                    "{} not found: build it with `cargo build -p pim-sidecar-examples --bins`, or pass --bin-dir",
                    cmd.program.display()
                );
            }
        }
    }
    Ok(configs)
}

fn print_event(ev: &MeshEvent) {
    match ev {
        MeshEvent::Frame {
            from,
            to,
            frame,
            plugin,
        } => {
            let what = match frame {
                ControlFrame::PluginPayload { kind, body } => {
                    format!("PluginPayload {kind} {:?}", String::from_utf8_lossy(body))
                }
                other => format!("{other:?}"),
            };
            let dest = plugin.map_or("no plugin".to_owned(), |p| format!("plugin {p}"));
            println!("  payload  {from} -> {to}: {what} => {dest}");
        }
        MeshEvent::PortCall { node, call } => println!("  host rpc {node}: {call}"),
    }
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let declared = sidecars(&args)?;
    let tmp = tempfile::Builder::new().prefix("pim-demo-").tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let mesh = Mesh::new();
    let mut events = mesh.take_events().expect("events are taken once, here");
    let mut plugins = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let node_dir = root.join(name);
        std::fs::create_dir_all(node_dir.join("data"))?;
        let node = mesh.add_node(name, [i as u8 + 1; 32], node_dir.join("data"));
        for declared in &declared {
            let mut config = declared.clone();
            config.socket_dir = node_dir.join("sock");
            let plugin = Arc::new(SidecarPlugin::new(config)?);
            mesh.start_plugin(&node, plugin.clone()).await?;
            println!(
                "{name}: {} sidecar pid {:?} on {}",
                plugin.name(),
                plugin.pid(),
                plugin.socket_path().display()
            );
            if plugin.name() == "echo" {
                plugins.push((node.clone(), plugin));
            }
        }
    }
    anyhow::ensure!(
        plugins.len() == 3,
        "the demo needs the `echo` sidecar in {}",
        args.config.display()
    );
    let (alice, alice_echo) = plugins[0].clone();
    println!("\nscenario: alice pings bob and carol");
    for (peer, _) in &plugins[1..] {
        let ping = ControlFrame::PluginPayload {
            kind: "echo.ping".into(),
            body: format!("hi {}", peer.name).into(),
        };
        alice.send(peer.id, ping).await;
    }
    // Two pongs reach alice's echo sidecar and it acks them.
    let wait = async {
        let mut pongs = 0;
        while pongs < 2 {
            let Some(ev) = events.recv().await else { break };
            print_event(&ev);
            if matches!(&ev, MeshEvent::Frame { to, frame: ControlFrame::PluginPayload { kind, .. }, plugin: Some(_), .. } if to == "alice" && kind == "echo.pong")
            {
                pongs += 1;
            }
        }
        while alice_echo.stats().queue.acked_seq < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| anyhow::anyhow!("the scenario did not finish within 30 s"))?;
    println!("\nscenario: alice forgets carol");
    alice.forget(plugins[2].0.id).await;
    while alice_echo.stats().queue.acked_seq < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if args.serve {
        // Caught from here on, before anything says the host is serving.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let sock = alice_echo.socket_path();
        println!(
            "\nserving; in another shell (Ctrl-C here stops), then the commands in README.md:"
        );
        println!(
            "export SOCK={} TOKEN={} NODE={}",
            sock.display(),
            alice_echo.token(),
            base64(plugins[1].0.id.as_bytes())
        );
        let printer = tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                print_event(&ev);
            }
        });
        // Ctrl-C or SIGTERM (a service manager, `kill`): stop in order, so
        // every sidecar is shut down and every socket removed.
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        printer.abort();
    }
    println!("\nshutting down");
    mesh.shutdown().await;
    for (node, plugin) in &plugins {
        let s = plugin.stats();
        println!(
            "{}: delivered {} acked {} dropped {} restarts {}",
            node.name, s.queue.delivered, s.queue.acked_seq, s.queue.dropped_overflow, s.restarts
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
