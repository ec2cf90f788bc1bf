//! The Python sidecar (examples/python's `pim_sidecar` module over grpcio)
//! beside raw grpcio floors in the same run: delivery throughput against a
//! grpcio client that only counts the events of a plain tonic stream, and
//! the module's LookupX25519 round trip against a raw grpcio unary call to
//! a plain tonic server with a trivial handler. Beside the throughput, the
//! module's delivery loop against the floor's counting loop in one process
//! without gRPC (`bench/python/loop_cost.py`): the module's work per event
//! around the handler, less touched by the machine's noise than the stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pim_plugin_bridge::{CommandSpec, Launch};

use super::{
    floor, ns, our_throughput, raw_stream_floor_with, sidecar_config, start_host, Report, Scale,
    Target,
};

/// `bench/python`: the benchmark's Python sidecar and floor client.
fn scripts() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
}

pub(crate) async fn python(report: &mut Report, scale: Scale, dir: &Path) -> anyhow::Result<()> {
    let smoke = scale.spawns < 10;
    let (n, rtts) = if smoke { (500, 100) } else { (200_000, 2_000) };
    println!("\n# the Python sidecar (examples/python, grpcio) beside raw grpcio in the same run, 64 B payloads");
    let python =
        tokio::task::spawn_blocking(|| pim_sidecar_examples::python_or_skip("the python phase"))
            .await?;
    let Some(python) = python else {
        return Ok(());
    };
    // The module's delivery loop against the floor's counting loop, in one
    // process without gRPC: the module's work per event around the
    // handler, with the fastest of many rounds (the least noisy figure).
    let loop_ns = loop_cost(&python, if smoke { 3 } else { 21 }).await?;
    let mut config = sidecar_config(dir, "-py", false);
    config.payload_kinds = vec!["bench.data".into(), "bench.cmd".into()];
    config.launch =
        Launch::Spawn(CommandSpec::new(&python).arg(scripts().join("bench_sidecar.py")));
    config.sandbox.read_paths = pim_sidecar_examples::python_read_paths(&python, &[scripts()])?;
    let mut host = start_host(config, dir).await?;

    // Median of five runs each, in turn (a run is about a third of a
    // second, and the machine's speed varies by a third within that). The
    // floor's messages carry as many events as the host's batches
    // (MAX_BATCH_EVENTS, 256):
    // what is compared is the work per event, the module's against a loop
    // that only counts. The floor reads its stream on the calling thread
    // as the module does (grpcio's SingleThreadedUnaryStream); a plain
    // grpcio client, each message handed over from grpcio's own thread, is
    // shown beside it.
    let (mut floors, mut plains, mut ourss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..5 {
        let modes = [("single-threaded", &mut floors), ("default", &mut plains)];
        for (i, (mode, rates)) in modes.into_iter().enumerate() {
            let mut client = tokio::process::Command::new(&python);
            client.arg(scripts().join("floor_client.py"));
            let run = 900 + 2 * run + i;
            let batch = pim_sidecar::proto::limits::MAX_BATCH_EVENTS as u64;
            rates.push(raw_stream_floor_with(client, &[mode], batch, dir, 64, n, run).await?);
        }
        ourss.push(our_throughput(&host, 64, n).await);
    }
    for rates in [&mut floors, &mut plains, &mut ourss] {
        rates.sort_by(f64::total_cmp);
    }
    let (floor_rate, plain, ours) = (floors[2], plains[2], ourss[2]);
    report.row(
        &format!("Python sidecar throughput, 64 B ({n} payloads)"),
        format!("{:.1} k/s", ours / 1e3),
        format!("raw grpcio {:.1} k/s", floor_rate / 1e3),
        format!("{:.2}x", ours / floor_rate),
        Target::at_least(ours, 0.8 * floor_rate, ">= 0.8x raw grpcio"),
    );
    report.row(
        "  beside a plain grpcio client (grpcio's own thread)",
        format!("{:.1} k/s", ours / 1e3),
        format!("plain grpcio {:.1} k/s", plain / 1e3),
        format!("{:.2}x", ours / plain),
        None,
    );

    report.row(
        "  the module's loop per event, no gRPC (fastest round)",
        ns(loop_ns.0),
        format!("counting loop {}", ns(loop_ns.1)),
        format!("{:.2}x", loop_ns.0 as f64 / loop_ns.1 as f64),
        None,
    );

    let sock = dir.join("floor-py-rtt.sock");
    let _floor = floor::serve(&sock)?;
    let reply = host
        .command(&format!("rtt {} {rtts}", sock.display()))
        .await?;
    let f = crate::stats::numbers(&reply);
    anyhow::ensure!(
        f.len() == 4,
        "unexpected reply from the Python sidecar: {reply}"
    );
    report.row(
        "Python LookupX25519 round trip, median",
        ns(f[0]),
        format!("raw grpcio {}", ns(f[2])),
        format!("{:.2}x", f[0] as f64 / f[2] as f64),
        // At least 0.8x the floor's rate of calls: at most 1.25x its time.
        Target::at_most(f[0] as f64, 1.25 * f[2] as f64, "<= 1.25x raw grpcio"),
    );
    report.row(
        "  p99",
        ns(f[1]),
        format!("raw grpcio {}", ns(f[3])),
        format!("{:.2}x", f[1] as f64 / f[3] as f64),
        None,
    );
    host.stop().await;
    Ok(())
}

/// Runs `bench/python/loop_cost.py` for `rounds` rounds: the fastest round's
/// ns per event of the module's loop and of the counting loop.
async fn loop_cost(python: &Path, rounds: u32) -> anyhow::Result<(u64, u64)> {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(scripts().join("loop_cost.py"))
        .arg(rounds.to_string());
    let line = tokio::time::timeout(
        Duration::from_secs(120),
        crate::stats::probe_line(command, "loop ", "bench/python/loop_cost.py"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("bench/python/loop_cost.py did not finish within 120 s"))??;
    let f = crate::stats::numbers(&line);
    anyhow::ensure!(f.len() == 4, "unexpected output of loop_cost.py: {line}");
    Ok((f[0], f[1]))
}
