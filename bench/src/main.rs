//! `pim-bench`: the sidecar plugin system measured against floors measured
//! in the same run, printed as figures and ratios.
//!
//! ```text
//! cargo run --release -p pim-sidecar-bench            # the full run (about ten minutes on two cores)
//! cargo run --release -p pim-sidecar-bench -- --smoke # tiny counts, no targets
//! cargo run --release -p pim-sidecar-bench -- --only throughput   # one phase:
//!     # cost, throughput, latency, sustainable, rtt, e2e, python, spawn, memory or many
//! target/release/pim-bench at 64 20000 3              # one rate of the sustainable search
//! ```
//!
//! The same executable is also the benchmark's sidecar (`pim-bench
//! sidecar`), the raw stream floor's client (`pim-bench floor-client`),
//! the raw echo pattern's client (`pim-bench raw-echo-client`),
//! the memory probe (`pim-bench memory`) and the many-sidecars probe
//! (`pim-bench many`), each a separate process.

mod e2e;
mod floor;
mod many;
mod python;
mod raw_echo;
mod sidecar;
mod stats;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::{
    ControlSender, DaemonPlugin, IdentitySecrets, PeerDirectory, PeerDirectoryEvent, PluginContext,
};
use pim_plugin_bridge::{CommandSpec, Launch, Sandbox, SidecarConfig, SidecarPlugin};
use pim_protocol::ControlFrame;
use pim_sidecar::proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::stats::{median_p99, mono_ns};

/// Counts of one run.
#[derive(Clone, Copy)]
struct Scale {
    calls: usize,
    sizes: [(usize, u64); 4],
    latency_secs: f64,
    rtts: usize,
    spawns: usize,
}

const FULL: Scale = Scale {
    calls: 200_000,
    sizes: [
        (64, 1_000_000),
        (1024, 400_000),
        (16 * 1024, 50_000),
        (65_535, 15_000),
    ],
    latency_secs: 2.0,
    rtts: 20_000,
    spawns: 20,
};

const SMOKE: Scale = Scale {
    calls: 2_000,
    sizes: [(64, 2_000), (1024, 1_000), (16 * 1024, 200), (65_535, 50)],
    latency_secs: 0.2,
    rtts: 200,
    spawns: 2,
};

/// Ports whose calls cost next to nothing, so the figures are the plugin
/// system's own. `bench.result` payloads come back on a channel; so does
/// the latency of each `<name>.pong` sent routed (from the timestamp in the
/// first 8 bytes of its body to its arrival here).
struct BenchPorts {
    results: mpsc::UnboundedSender<String>,
    /// Each pong's latency (ns), and whether it arrived on the CPU that
    /// the sidecar's handler ran on.
    pongs: mpsc::UnboundedSender<(u64, bool)>,
    events: broadcast::Sender<PeerDirectoryEvent>,
}

#[async_trait]
impl PeerDirectory for BenchPorts {
    async fn lookup_x25519(&self, _: &NodeId) -> Option<[u8; 32]> {
        Some([1; 32])
    }

    async fn lookup_name(&self, _: &NodeId) -> Option<String> {
        None
    }

    fn subscribe(&self) -> broadcast::Receiver<PeerDirectoryEvent> {
        self.events.subscribe()
    }
}

#[async_trait]
impl ControlSender for BenchPorts {
    async fn send_direct(&self, _: NodeId, frame: ControlFrame) {
        if let ControlFrame::PluginPayload { kind, body } = frame {
            if kind.ends_with(".result") {
                let _ = self
                    .results
                    .send(String::from_utf8_lossy(&body).into_owned());
            }
        }
    }

    async fn send_routed(&self, _: NodeId, frame: ControlFrame) -> bool {
        if let ControlFrame::PluginPayload { kind, body } = frame {
            if let (true, Some(sent)) = (kind.ends_with(".pong"), body.get(..8)) {
                let sent = u64::from_le_bytes(sent.try_into().expect("8 bytes"));
                let latency = mono_ns().saturating_sub(sent);
                // Bytes 8..12: the CPU the sidecar's handler ran on.
                let here = crate::stats::current_cpu();
                let same_cpu = here != u32::MAX
                    && body.get(8..12).is_some_and(|cpu| cpu == here.to_le_bytes());
                let _ = self.pongs.send((latency, same_cpu));
            }
        }
        true
    }
}

impl IdentitySecrets for BenchPorts {
    fn signing_seed(&self) -> [u8; 32] {
        [0; 32]
    }
}

/// An in-process plugin whose handler does what a minimal one does: hand
/// the payload to its own task through an mpsc.
struct InProcess {
    tx: mpsc::Sender<Bytes>,
}

#[async_trait]
impl DaemonPlugin for InProcess {
    fn name(&self) -> &'static str {
        "inproc"
    }

    fn payload_kinds(&self) -> &'static [&'static str] {
        &["bench.data"]
    }

    async fn handle_payload(&self, _: NodeId, _: &str, body: Bytes) {
        let _ = self.tx.try_send(body);
    }

    async fn start(self: Arc<Self>, _: PluginContext) -> anyhow::Result<()> {
        Ok(())
    }

    async fn on_peer_forgotten(&self, _: NodeId) {}

    async fn shutdown(&self) {}
}

struct Host {
    plugin: Arc<SidecarPlugin>,
    /// `<name>.data`, `<name>.cmd` and `<name>.ping`.
    data: String,
    cmd: String,
    ping: String,
    results: mpsc::UnboundedReceiver<String>,
    pongs: mpsc::UnboundedReceiver<(u64, bool)>,
    cancel: CancellationToken,
}

fn sidecar_config(dir: &Path, name_suffix: &str, stall: bool) -> SidecarConfig {
    let exe = std::env::current_exe().expect("the bench knows its own path");
    let mut command = CommandSpec::new(exe).arg("sidecar");
    if stall {
        command = command.env("BENCH_STALL", "1");
    }
    let mut config = SidecarConfig::spawn(
        "bench",
        ["bench.data", "bench.cmd", "bench.ping"],
        dir.join(format!("sock{name_suffix}")),
        command,
    );
    config.stuck_timeout = None;
    // `PIM_BENCH_SERVER_THREAD=0`: serve on the daemon's runtime instead of
    // the shared socket-server threads, to compare the two.
    if std::env::var_os("PIM_BENCH_SERVER_THREAD").is_some_and(|v| v == "0") {
        config.server_thread = false;
    }
    config.queue.max_events = 4 << 20;
    config.queue.max_bytes = 2 << 30;
    config
}

async fn start_host(config: SidecarConfig, data_dir: &Path) -> anyhow::Result<Host> {
    let (results_tx, results) = mpsc::unbounded_channel();
    let (pongs_tx, pongs) = mpsc::unbounded_channel();
    let ports = Arc::new(BenchPorts {
        results: results_tx,
        pongs: pongs_tx,
        events: broadcast::channel(16).0,
    });
    let cancel = CancellationToken::new();
    let (data, cmd, ping) = (
        format!("{}.data", config.name),
        format!("{}.cmd", config.name),
        format!("{}.ping", config.name),
    );
    let plugin = Arc::new(SidecarPlugin::new(config)?);
    plugin
        .clone()
        .start(PluginContext {
            peers: ports.clone(),
            control: ports.clone(),
            identity: ports,
            data_dir: data_dir.to_owned(),
            cancel: cancel.clone(),
        })
        .await?;
    Ok(Host {
        plugin,
        data,
        cmd,
        ping,
        results,
        pongs,
        cancel,
    })
}

impl Host {
    async fn command(&mut self, cmd: &str) -> anyhow::Result<String> {
        self.plugin
            .handle_payload(
                NodeId::from_bytes([1; 16]),
                &self.cmd,
                Bytes::from(cmd.to_owned()),
            )
            .await;
        tokio::time::timeout(Duration::from_secs(120), self.results.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the bench sidecar went away"))
    }

    /// Waits until the sidecar acked `seq`. Panics after two minutes: the
    /// bench must not hang.
    async fn wait_acked(&self, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.plugin.progress().1 < seq {
            assert!(
                Instant::now() < deadline,
                "the bench sidecar acked {} of {seq} within two minutes",
                self.plugin.progress().1
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    async fn stop(self) {
        self.plugin.shutdown().await;
        self.cancel.cancel();
    }
}

/// A target: `value` must be at most (or at least) `bound`.
struct Target {
    value: f64,
    bound: f64,
    higher_is_better: bool,
    text: String,
}

impl Target {
    fn at_most(value: f64, bound: f64, text: &str) -> Option<Self> {
        Some(Self {
            value,
            bound,
            higher_is_better: false,
            text: text.into(),
        })
    }

    fn at_least(value: f64, bound: f64, text: &str) -> Option<Self> {
        Some(Self {
            value,
            bound,
            higher_is_better: true,
            text: text.into(),
        })
    }

    fn met(&self) -> bool {
        if self.higher_is_better {
            self.value >= self.bound
        } else {
            self.value <= self.bound
        }
    }

    /// How far off, as a percentage of the bound.
    fn shortfall_percent(&self) -> f64 {
        (self.value - self.bound).abs() / self.bound.max(f64::MIN_POSITIVE) * 100.0
    }
}

struct Report {
    rows: usize,
    smoke: bool,
    missed: Vec<String>,
}

impl Report {
    /// One line; a `target` that is missed is listed with how far off it is.
    fn row(
        &mut self,
        what: &str,
        value: String,
        floor: String,
        ratio: String,
        target: Option<Target>,
    ) {
        let verdict = match (&target, self.smoke) {
            (_, true) | (None, _) => String::new(),
            (Some(t), false) if t.met() => format!("ok ({})", t.text),
            (Some(t), false) => {
                let by = t.shortfall_percent();
                self.missed.push(format!(
                    "{what}: {value}, target {}: missed by {by:.1}%",
                    t.text
                ));
                format!("MISSED by {by:.1}% ({})", t.text)
            }
        };
        println!("{what:<44} {value:>22} {floor:>22} {ratio:>8}  {verdict}");
        self.rows += 1;
    }
}

fn ns(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} µs", v as f64 / 1000.0)
    } else {
        format!("{v} ns")
    }
}

/// Per-call times of `n` calls of `f`, in ns, each including one clock read.
async fn time_calls<F, Fut>(n: usize, mut f: F) -> Vec<u64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        out.push(t.elapsed().as_nanos() as u64);
    }
    out
}

async fn handle_payload_cost(report: &mut Report, scale: Scale, dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n# daemon-side handle_payload cost ({} calls each, 64 B bodies, consumer draining, steady state)",
        scale.calls
    );
    let body = Bytes::from(vec![0u8; 64]);
    let src = NodeId::from_bytes([2; 16]);

    let mut clock = time_calls(scale.calls, |_| async {}).await;
    let (clock_med, _) = median_p99(&mut clock);

    let (tx, mut rx) = mpsc::channel::<Bytes>(1 << 20);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut floor = Vec::new();
    for _round in 0..2 {
        floor = time_calls(scale.calls, |_| {
            let _ = tx.try_send(body.clone());
            async {}
        })
        .await;
    }
    drop(tx);
    let _ = drain.await;
    let (floor_med, floor_p99) = median_p99(&mut floor);

    let (tx, mut rx) = mpsc::channel::<Bytes>(1 << 20);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let inproc = InProcess { tx };
    let mut inproc_t = Vec::new();
    for _round in 0..2 {
        inproc_t = time_calls(scale.calls, |_| {
            inproc.handle_payload(src, "bench.data", body.clone())
        })
        .await;
    }
    drop(inproc);
    let _ = drain.await;
    let (in_med, in_p99) = median_p99(&mut inproc_t);

    let mut host = start_host(sidecar_config(dir, "-cost", false), dir).await?;
    let plugin = host.plugin.clone();
    // Steady state: a first round grows the queue to its high-water mark (a
    // burst this fast outruns any sidecar, so the queue grows into fresh
    // pages); the second, measured round reuses that memory, as a running
    // daemon does.
    let mut ours = Vec::new();
    for _round in 0..2 {
        let base = host.plugin.progress().0;
        ours = time_calls(scale.calls, |_| {
            plugin.handle_payload(src, "bench.data", body.clone())
        })
        .await;
        host.wait_acked(base + scale.calls as u64).await;
    }
    let (med, p99) = median_p99(&mut ours);
    let _ = host.command("lat-report").await;
    host.stop().await;

    report.row(
        "clock read (included in each figure below)",
        ns(clock_med),
        String::new(),
        String::new(),
        None,
    );
    report.row(
        "tokio mpsc try_send  median / p99",
        format!("{} / {}", ns(floor_med), ns(floor_p99)),
        String::new(),
        String::new(),
        None,
    );
    report.row(
        "in-process DaemonPlugin call  median / p99",
        format!("{} / {}", ns(in_med), ns(in_p99)),
        String::new(),
        String::new(),
        None,
    );
    report.row(
        "SidecarPlugin::handle_payload  median",
        ns(med),
        format!("try_send {}", ns(floor_med)),
        format!("{:.2}x", med as f64 / floor_med.max(1) as f64),
        Target::at_most(med as f64, 100.0, "<= 100 ns"),
    );
    report.row(
        "SidecarPlugin::handle_payload  p99",
        ns(p99),
        format!("try_send {}", ns(floor_p99)),
        format!("{:.2}x", p99 as f64 / floor_p99.max(1) as f64),
        Target::at_most(p99 as f64, 2.0 * floor_p99 as f64, "<= 2.0x try_send p99"),
    );
    Ok(())
}

fn event(seq: u64, body: &Bytes) -> pb::Event {
    pb::Event {
        seq,
        event: Some(pb::event::Event::Payload(pb::Payload {
            src: Bytes::from_static(&[2; 16]),
            kind: "bench.data".into(),
            body: body.clone(),
        })),
    }
}

/// Payloads per second through a plain tonic stream fed from an mpsc, one
/// payload per message, to a client process.
async fn raw_stream_floor(dir: &Path, size: usize, n: u64, run: usize) -> anyhow::Result<f64> {
    let mut client = tokio::process::Command::new(std::env::current_exe()?);
    client.arg("floor-client");
    raw_stream_floor_with(client, &[], 1, dir, size, n, run).await
}

/// [`raw_stream_floor`] with another client, which gets the socket, the
/// count and then `client_args` as its last arguments, and `batch`
/// payloads per message.
async fn raw_stream_floor_with(
    mut client: tokio::process::Command,
    client_args: &[&str],
    batch: u64,
    dir: &Path,
    size: usize,
    n: u64,
    run: usize,
) -> anyhow::Result<f64> {
    let sock = dir.join(format!("floor-{size}-{run}.sock"));
    let floor = floor::serve(&sock)?;
    let mut client = client
        .arg(&sock)
        .arg(n.to_string())
        .args(client_args)
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::timeout(Duration::from_secs(30), floor.opened).await??;
    let body = Bytes::from(vec![7u8; size]);
    let started = Instant::now();
    for first in (1..=n).step_by(batch.max(1) as usize) {
        let msg = pb::EventsResponse {
            events: (first..=n.min(first + batch.max(1) - 1))
                .map(|seq| event(seq, &body))
                .collect(),
        };
        if floor.feed.send(Ok(msg)).await.is_err() {
            anyhow::bail!("the floor client went away");
        }
    }
    let acked = tokio::time::timeout(Duration::from_secs(300), floor.acked).await??;
    let elapsed = started.elapsed();
    anyhow::ensure!(acked == n, "the floor client acked {acked} of {n}");
    let _ = client.wait().await;
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Payloads per second from `handle_payload` to the sidecar's handler, acked.
async fn our_throughput(host: &Host, size: usize, n: u64) -> f64 {
    let src = NodeId::from_bytes([2; 16]);
    let base = host.plugin.progress().0;
    let mut raw = vec![7u8; size];
    let mut body = Bytes::new();
    let started = Instant::now();
    for i in 0..n {
        // Keep the queue from growing without bound, as a busy mesh would,
        // by sleeping (as the raw stream's producer parks on its full
        // channel: spinning here would take a CPU from the consumer); a
        // fresh body (and timestamp) every 1,024 payloads, shared between
        // them like the raw stream's.
        if i % 1024 == 0 {
            while {
                let (newest, acked) = host.plugin.progress();
                newest - acked > 200_000
            } {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            raw[..8].copy_from_slice(&mono_ns().to_le_bytes());
            body = Bytes::copy_from_slice(&raw);
        }
        host.plugin
            .handle_payload(src, &host.data, body.clone())
            .await;
    }
    host.wait_acked(base + n).await;
    n as f64 / started.elapsed().as_secs_f64()
}

async fn throughput(report: &mut Report, scale: Scale, dir: &Path) -> anyhow::Result<f64> {
    println!("\n# end-to-end throughput, handle_payload -> sidecar handler, acks on (median of 3)");
    let host = start_host(sidecar_config(dir, "-tput", false), dir).await?;
    let mut max_64 = 0.0;
    for (i, (size, n)) in scale.sizes.into_iter().enumerate() {
        // Median of three runs each, alternating, so that a slow moment of
        // the machine does not decide a ratio.
        let (mut floors, mut ourss) = (Vec::new(), Vec::new());
        for run in 0..3 {
            floors.push(raw_stream_floor(dir, size, n, run).await?);
            ourss.push(our_throughput(&host, size, n).await);
        }
        floors.sort_by(f64::total_cmp);
        ourss.sort_by(f64::total_cmp);
        let (floor, ours) = (floors[1], ourss[1]);
        if size == 64 {
            max_64 = ours;
        }
        let target = [1.0, 0.9, 0.8, 0.0][i];
        let mbs = |r: f64| r * size as f64 / 1e6;
        report.row(
            &format!("throughput {size} B bodies ({n} payloads)"),
            format!("{:.0} k/s {:.0} MB/s", ours / 1e3, mbs(ours)),
            format!("{:.0} k/s {:.0} MB/s", floor / 1e3, mbs(floor)),
            format!("{:.2}x", ours / floor),
            if target > 0.0 {
                Target::at_least(ours, target * floor, &format!(">= {target:.1}x raw stream"))
            } else {
                None
            },
        );
        if size == 64 {
            logging_cost(report, dir, n, ours).await?;
        }
    }
    host.stop().await;
    Ok(max_64)
}

/// The default that used to cost: the same 64 B run with the sidecar
/// writing a log line per payload at INFO (the SDK's default level), which
/// the daemon reads, parses and forwards.
async fn logging_cost(report: &mut Report, dir: &Path, n: u64, quiet: f64) -> anyhow::Result<()> {
    let mut config = sidecar_config(dir, "-log", false);
    if let Launch::Spawn(command) = &mut config.launch {
        command.env.push(("BENCH_LOG_EACH".into(), "1".into()));
    }
    let host = start_host(config, dir).await?;
    let logged = our_throughput(&host, 64, n / 4).await;
    host.stop().await;
    report.row(
        "  the same, the sidecar logging each payload at INFO",
        format!("{:.0} k/s", logged / 1e3),
        format!("quiet {:.0} k/s", quiet / 1e3),
        format!("{:.2}x", logged / quiet),
        None,
    );
    Ok(())
}

/// Half of a raw 64 B Unix-socket ping-pong between two processes (the bench
/// sidecar's `rtt` loop measures the same pair of wake-ups): the least a
/// one-way hand-over to another process can cost; median ns.
async fn half_ping_pong(host: &mut Host, dir: &Path, n: usize) -> anyhow::Result<u64> {
    let floor_sock = dir.join("floor-half.sock");
    let echo_sock = dir.join("echo-half.sock");
    let _floor = floor::serve(&floor_sock)?;
    floor::serve_echo(&echo_sock)?;
    let reply = host
        .command(&format!(
            "rtt {} {} {n}",
            floor_sock.display(),
            echo_sock.display()
        ))
        .await?;
    // `rtt` answers five median/p99 pairs; the ping-pong is the last one.
    let f = crate::stats::numbers(&reply);
    anyhow::ensure!(f.len() >= 10, "unexpected rtt reply: {reply}");
    Ok(f[6] / 2)
}

/// How a run at a fixed rate went.
struct AtRate {
    /// Delivery latency (median, p99) in ns; `None` when the backlog grew
    /// past what a 1 ms p99 allows and the run was cut short.
    latency: Option<(u64, u64)>,
    /// CPU time of both processes (the daemon or floor server, with the
    /// producer, and the sidecar or floor client) per payload, ns.
    cpu_ns: f64,
    /// The sidecar's or floor client's share of it, ns.
    client_cpu_ns: f64,
    /// Context switches of both processes' threads per payload.
    switches: f64,
}

impl AtRate {
    /// Measures the CPU time and context switches of this process and the
    /// `client` process from now.
    fn meter(client: Option<u32>) -> impl FnOnce(u64, Option<(u64, u64)>) -> AtRate {
        let client: Vec<u32> = client.into_iter().collect();
        let (switches0, ticks0) = crate::stats::sum(&[std::process::id()]);
        let (client_switches0, client_ticks0) = crate::stats::sum(&client);
        move |payloads, latency| {
            let (switches1, ticks1) = crate::stats::sum(&[std::process::id()]);
            let (client_switches1, client_ticks1) = crate::stats::sum(&client);
            let n = payloads.max(1) as f64;
            let per_payload =
                |ticks: u64| ticks as f64 * 1e9 / crate::stats::clock_ticks_per_second() / n;
            let client_ticks = client_ticks1.saturating_sub(client_ticks0);
            AtRate {
                latency,
                cpu_ns: per_payload(ticks1.saturating_sub(ticks0) + client_ticks),
                client_cpu_ns: per_payload(client_ticks),
                switches: (switches1.saturating_sub(switches0)
                    + client_switches1.saturating_sub(client_switches0))
                    as f64
                    / n,
            }
        }
    }

    /// Whether the p99 stayed within 1 ms.
    fn holds(&self) -> bool {
        self.latency.is_some_and(|(_, p99)| p99 <= 1_000_000)
    }

    /// For the search's log lines.
    fn shown(&self) -> String {
        // CPU time comes in clock ticks (10 ms): 2,000 ns per payload in
        // a 5 s run at 1,000/s, under 3 ns at 724,000/s.
        let cost = format!(
            "; {:.0} ns CPU ({:.0} ns in the client) and {:.2} context switches per payload",
            self.cpu_ns, self.client_cpu_ns, self.switches
        );
        match self.latency {
            Some((median, p99)) => format!("median {}, p99 {}{cost}", ns(median), ns(p99)),
            None => format!("behind (the backlog passed 100 ms' worth){cost}"),
        }
    }
}

/// Pushes `size` B payloads to our sidecar at `rate`/s for `secs`; their
/// delivery latency. With `cut_short`, a backlog of unacked payloads of
/// more than 100 ms' worth (at least 10,000) ends the run early: that rate
/// is not sustainable (acks lag delivery by the SDK's ack interval, so a
/// smaller backlog is not yet a sign).
async fn ours_at(
    host: &mut Host,
    size: usize,
    rate: f64,
    secs: f64,
    cut_short: bool,
) -> anyhow::Result<AtRate> {
    host.command("lat-start").await?;
    let meter = AtRate::meter(host.plugin.pid());
    let per_ms = (rate / 1000.0).max(1.0) as u64;
    let ticks = (secs * 1000.0) as u64;
    let base = host.plugin.progress().0;
    let src = NodeId::from_bytes([2; 16]);
    let mut raw = vec![7u8; size.max(8)];
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    let mut behind = false;
    for _ in 0..ticks {
        interval.tick().await;
        for _ in 0..per_ms {
            raw[..8].copy_from_slice(&mono_ns().to_le_bytes());
            host.plugin
                .handle_payload(src, &host.data, Bytes::copy_from_slice(&raw))
                .await;
            sent += 1;
        }
        let (newest, acked) = host.plugin.progress();
        if cut_short && newest - acked > (100 * per_ms).max(10_000) {
            behind = true;
            break;
        }
    }
    host.wait_acked(base + sent).await;
    let reply = host.command("lat-report").await?;
    let f = crate::stats::numbers(&reply);
    Ok(meter(sent, (!behind && f.len() >= 2).then(|| (f[0], f[1]))))
}

/// The raw tonic stream at `rate`/s for `secs`, `size` B payloads, one per
/// message; their latency.
async fn raw_at(
    dir: &Path,
    size: usize,
    rate: f64,
    secs: f64,
    run: usize,
) -> anyhow::Result<AtRate> {
    raw_at_on(dir, size, rate, secs, run, floor::Flavor::OneThread).await
}

/// [`raw_at`] with the floor server on a runtime of `flavor`.
async fn raw_at_on(
    dir: &Path,
    size: usize,
    rate: f64,
    secs: f64,
    run: usize,
    flavor: floor::Flavor,
) -> anyhow::Result<AtRate> {
    let per_ms = (rate / 1000.0).max(1.0) as u64;
    let ticks = (secs * 1000.0) as u64;
    let n = per_ms * ticks;
    let sock = dir.join(format!("floor-rate-{run}-{flavor:?}.sock"));
    let floor = floor::serve_on(&sock, flavor)?;
    let client = tokio::process::Command::new(std::env::current_exe()?)
        .arg("floor-client")
        .arg(&sock)
        .arg(n.to_string())
        .arg("latency")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::timeout(Duration::from_secs(30), floor.opened).await??;
    let meter = AtRate::meter(client.id());
    let mut raw = vec![7u8; size.max(8)];
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0;
    for _ in 0..ticks {
        interval.tick().await;
        for _ in 0..per_ms {
            seq += 1;
            raw[..8].copy_from_slice(&mono_ns().to_le_bytes());
            let msg = pb::EventsResponse {
                events: vec![event(seq, &Bytes::copy_from_slice(&raw))],
            };
            if floor.feed.send(Ok(msg)).await.is_err() {
                anyhow::bail!("the floor client went away");
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(120), floor.acked).await??;
    // The client has acked and is exiting; until it is waited for, its
    // figures stay readable.
    let measured = meter(n, None);
    let out = client.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f = crate::stats::numbers(
        text.lines()
            .find(|l| l.starts_with("lat "))
            .ok_or_else(|| anyhow::anyhow!("the floor client printed no figures: {text}"))?,
    );
    anyhow::ensure!(f.len() >= 2, "the floor client printed no figures: {text}");
    Ok(AtRate {
        latency: Some((f[0], f[1])),
        ..measured
    })
}

/// The search for the highest rate with p99 ≤ 1 ms. The p99 is not
/// monotonic in the rate (at low rates every payload pays for waking
/// sleeping threads; at high rates they stay awake), so a miss at one rate
/// does not end it: a sweep from 1,000/s up to a quarter of the burst
/// maximum by factors of 4, then `refine` steps of bisection on a log
/// scale between the highest rate that held and the next rate of the sweep
/// (or 4x it).
struct RateSearch {
    /// Rates still to sweep, lowest last.
    sweep: Vec<f64>,
    /// The next sweep rate above the highest that held (or the maximum).
    above: f64,
    refine: usize,
    /// The highest rate that held.
    best: Option<f64>,
    /// The lowest p99 seen and its rate, for the report when none held.
    lowest_p99: Option<(u64, f64)>,
}

impl RateSearch {
    fn new(max: f64, refine: usize) -> Self {
        // Up to a quarter of the burst maximum: above it the queue builds
        // (at 80% of it latency is hundreds of milliseconds).
        let top = (max / 4.0).max(1000.0);
        let mut sweep = Vec::new();
        let mut rate = 1000.0;
        while rate <= top {
            sweep.push(rate);
            rate *= 4.0;
        }
        let max = rate;
        sweep.reverse();
        Self {
            sweep,
            above: max,
            refine,
            best: None,
            lowest_p99: None,
        }
    }

    /// The next rate to try, `None` when done.
    fn next(&self) -> Option<f64> {
        if let Some(rate) = self.sweep.last() {
            return Some(*rate);
        }
        match self.best {
            Some(lo) if self.refine > 0 && self.above / lo > 1.05 => Some((lo * self.above).sqrt()),
            _ => None,
        }
    }

    /// Records how the run at `rate` went.
    fn record(&mut self, rate: f64, result: &AtRate) {
        if let Some((_, p99)) = result.latency {
            if self.lowest_p99.is_none_or(|(p, _)| p99 < p) {
                self.lowest_p99 = Some((p99, rate));
            }
        }
        let held = result.holds();
        if self.sweep.pop().is_some() {
            if held {
                self.best = Some(rate);
                // The next sweep rate, or the maximum, bounds the refinement.
                self.above = self.sweep.last().copied().unwrap_or(rate * 4.0);
            }
            return;
        }
        self.refine -= 1;
        if held {
            self.best = Some(rate);
        } else {
            self.above = rate;
        }
    }

    /// The highest rate that held (0 if none did).
    fn result(&self) -> f64 {
        self.best.unwrap_or(0.0)
    }

    /// The result for the report: the rate, or, when none held, the lowest
    /// p99 seen and where.
    fn shown(&self) -> String {
        match (self.best, self.lowest_p99) {
            (Some(r), _) => format!("{:.0} k/s", r / 1e3),
            (None, Some((p, r))) => format!("none (p99 >= {} at {:.0} k/s)", ns(p), r / 1e3),
            (None, None) => "none (behind at every rate)".into(),
        }
    }
}

/// `pim-bench at <size> <rate> [runs]`: ours and the raw stream at one
/// rate, 5 s a run, alternating, the raw stream served by a single-threaded
/// runtime (the floor) and by a work-stealing one like the host's; each
/// run's latency, CPU and context switches. For profiling one point of the
/// sustainable-rate search.
async fn at_rate(size: usize, rate: f64, runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("pim-bench-").tempdir()?;
    let mut host = start_host(sidecar_config(dir.path(), "-at", false), dir.path()).await?;
    for run in 0..runs {
        let raw = raw_at(dir.path(), size, rate, 5.0, run).await?;
        println!("raw  {size} B at {rate:.0}/s: {}", raw.shown());
        let stealing = floor::Flavor::WorkStealing;
        let raw = raw_at_on(dir.path(), size, rate, 5.0, run, stealing).await?;
        println!(
            "raw, work-stealing, {size} B at {rate:.0}/s: {}",
            raw.shown()
        );
        let ours = ours_at(&mut host, size, rate, 5.0, true).await?;
        println!("ours {size} B at {rate:.0}/s: {}", ours.shown());
    }
    host.stop().await;
    Ok(())
}

/// One step of a rate search: `run` once, and once more if the p99 missed
/// (on a busy machine one slow moment decides a single run's p99); the last
/// result, each printed.
async fn try_twice(
    label: &str,
    rate: f64,
    mut run: impl AsyncFnMut() -> anyhow::Result<AtRate>,
) -> anyhow::Result<AtRate> {
    let mut result = run().await?;
    println!("  {label} at {rate:>7.0}/s: {}", result.shown());
    if !result.holds() {
        result = run().await?;
        println!("  {label} at {rate:>7.0}/s: {}", result.shown());
    }
    Ok(result)
}

/// The sustainable rate: the highest at which p99 delivery latency stays
/// within 1 ms over a run, ours and the raw stream's, 64 B and 1 KiB.
async fn sustainable(
    report: &mut Report,
    smoke: bool,
    dir: &Path,
    max_rate: f64,
) -> anyhow::Result<()> {
    let (secs, steps) = if smoke { (0.2, 1) } else { (5.0, 2) };
    // Smoke: the sweep's first two rates only.
    let max_rate = if smoke {
        max_rate.min(16_000.0)
    } else {
        max_rate
    };
    println!("\n# sustainable rate: the highest with p99 delivery latency <= 1 ms over {secs} s (search: 1,000/s to a quarter of the 64 B burst maximum by factors of 4, then {steps} bisection steps; a rate that misses is tried twice)");
    let mut host = start_host(sidecar_config(dir, "-rate", false), dir).await?;
    for size in [64usize, 1024] {
        // A rate that misses is tried once more, for both alike: on a busy
        // machine one slow moment decides a single 5 s p99.
        let mut raw = RateSearch::new(max_rate, steps);
        let mut run = 0;
        while let Some(rate) = raw.next() {
            let result = try_twice(&format!("raw  {size} B"), rate, async || {
                run += 1;
                raw_at(dir, size, rate, secs, size * 100 + run).await
            })
            .await?;
            raw.record(rate, &result);
        }
        let mut ours = RateSearch::new(max_rate, steps);
        while let Some(rate) = ours.next() {
            let result = try_twice(&format!("ours {size} B"), rate, async || {
                ours_at(&mut host, size, rate, secs, true).await
            })
            .await?;
            ours.record(rate, &result);
        }
        let (ours_rate, raw_rate) = (ours.result(), raw.result());
        report.row(
            &format!("sustainable rate, {size} B"),
            ours.shown(),
            format!("raw {}", raw.shown()),
            if raw_rate > 0.0 {
                format!("{:.2}x", ours_rate / raw_rate)
            } else {
                String::new()
            },
            // No target when the floor itself holds no rate on this machine.
            if raw_rate > 0.0 {
                Target::at_least(ours_rate, raw_rate, ">= 1.0x raw stream")
            } else {
                None
            },
        );
    }
    host.stop().await;
    Ok(())
}

async fn latency(
    report: &mut Report,
    scale: Scale,
    dir: &Path,
    max_rate: f64,
) -> anyhow::Result<()> {
    println!("\n# delivery latency, handle_payload -> sidecar handler (64 B bodies)");
    let mut host = start_host(sidecar_config(dir, "-lat", false), dir).await?;
    // Three runs each at 1,000/s, in turn: the raw stream on a single
    // thread (the floor), the raw stream on a work-stealing runtime like
    // the host's socket server (what that runtime costs a plain stream),
    // and ours; each figure the median of its three (one slow moment of
    // the machine decides a single run's p99).
    let secs = scale.latency_secs;
    let (mut floor_runs, mut stealing_runs, mut our_runs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..3 {
        let flavors = [
            ("raw", floor::Flavor::OneThread, &mut floor_runs),
            (
                "raw, work-stealing",
                floor::Flavor::WorkStealing,
                &mut stealing_runs,
            ),
        ];
        for (label, flavor, runs) in flavors {
            let at = raw_at_on(dir, 64, 1000.0, secs, run, flavor).await?;
            println!("  {label} at 1,000/s: {}", at.shown());
            // A raw run returns its client's figures or fails.
            runs.push(at.latency.expect("a raw run reports its latency"));
        }
        let at = ours_at(&mut host, 64, 1000.0, secs, false).await?;
        println!("  ours at 1,000/s: {}", at.shown());
        our_runs.push(
            at.latency
                .ok_or_else(|| anyhow::anyhow!("the bench sidecar reported no latencies"))?,
        );
    }
    let [(floor_median, floor_p99), (stealing_median, stealing_p99), ours] =
        [floor_runs, stealing_runs, our_runs].map(|runs| {
            let middle = |mut v: Vec<u64>| {
                v.sort_unstable();
                v[v.len() / 2]
            };
            (
                middle(runs.iter().map(|r| r.0).collect()),
                middle(runs.iter().map(|r| r.1).collect()),
            )
        });
    report.row(
        "raw tonic stream at 1,000/s (floor)",
        format!("{} / {}", ns(floor_median), ns(floor_p99)),
        "median / p99".into(),
        String::new(),
        None,
    );
    report.row(
        "  the same, work-stealing like the host's",
        format!("{} / {}", ns(stealing_median), ns(stealing_p99)),
        "median / p99".into(),
        String::new(),
        None,
    );
    let half = half_ping_pong(&mut host, dir, scale.rtts.min(5_000)).await?;
    report.row(
        "half a raw Unix-socket ping-pong",
        ns(half),
        "median".into(),
        String::new(),
        None,
    );
    let label = "latency at light load, 1,000/s";
    report.row(
        &format!("{label}  median"),
        ns(ours.0),
        format!("raw stream {}", ns(floor_median)),
        format!("{:.2}x", ours.0 as f64 / floor_median.max(1) as f64),
        Target::at_most(
            ours.0 as f64,
            1.1 * floor_median as f64,
            "<= 1.1x raw stream",
        ),
    );
    report.row(
        &format!("{label}  p99"),
        ns(ours.1),
        format!("raw stream {}", ns(floor_p99)),
        format!("{:.2}x", ours.1 as f64 / floor_p99.max(1) as f64),
        Target::at_most(ours.1 as f64, 1.5 * floor_p99 as f64, "<= 1.5x raw stream"),
    );
    for (what, value, stealing) in [
        ("median", ours.0, stealing_median),
        ("p99", ours.1, stealing_p99),
    ] {
        report.row(
            &format!("  {what} vs the raw stream work-stealing"),
            ns(value),
            format!("work-stealing {}", ns(stealing)),
            format!("{:.2}x", value as f64 / stealing.max(1) as f64),
            None,
        );
    }
    report.row(
        &format!("{label}  median vs half ping-pong"),
        ns(ours.0),
        format!("half ping-pong {}", ns(half)),
        format!("{:.2}x", ours.0 as f64 / half.max(1) as f64),
        None,
    );
    // Not cut short: at 80% of the burst maximum the backlog grows, and
    // how far is the figure.
    let rate = 0.8 * max_rate;
    let f = ours_at(&mut host, 64, rate, scale.latency_secs, false)
        .await?
        .latency
        .ok_or_else(|| anyhow::anyhow!("the bench sidecar reported no latencies"))?;
    report.row(
        &format!("latency at 80% of max throughput ({rate:.0}/s)"),
        format!("{} / {}", ns(f.0), ns(f.1)),
        "median / p99".into(),
        String::new(),
        None,
    );
    host.stop().await;
    Ok(())
}

async fn round_trips(report: &mut Report, scale: Scale, dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n# sidecar -> host round trips ({} each, the SDK's defaults: one-thread runtime, port calls busy-poll {} µs)",
        scale.rtts,
        pim_sidecar::default_busy_poll().as_micros()
    );
    let floor_sock = dir.join("floor-unary.sock");
    let _floor = floor::serve(&floor_sock)?;
    let echo_sock = dir.join("echo.sock");
    floor::serve_echo(&echo_sock)?;
    let mut host = start_host(sidecar_config(dir, "-rtt", false), dir).await?;
    let reply = host
        .command(&format!(
            "rtt {} {} {}",
            floor_sock.display(),
            echo_sock.display(),
            scale.rtts
        ))
        .await?;
    host.stop().await;
    let f = crate::stats::numbers(&reply);
    anyhow::ensure!(f.len() == 10, "bad rtt reply: {reply}");
    let (raw_med, raw_p99) = (f[4], f[5]);
    report.row(
        "raw Unix-socket ping-pong 64 B",
        format!("{} / {}", ns(f[6]), ns(f[7])),
        "median / p99".into(),
        String::new(),
        None,
    );
    report.row(
        "raw tonic unary (same runtime flavours)",
        format!("{} / {}", ns(raw_med), ns(raw_p99)),
        "median / p99".into(),
        String::new(),
        None,
    );
    let (polled_med, polled_p99) = (f[8], f[9]);
    report.row(
        "raw tonic unary, busy-polled like the SDK",
        format!("{} / {}", ns(polled_med), ns(polled_p99)),
        "median / p99".into(),
        String::new(),
        None,
    );
    for (what, med, p99) in [("LookupX25519", f[0], f[1]), ("SendRouted", f[2], f[3])] {
        report.row(
            &format!("{what} round trip  median / p99"),
            format!("{} / {}", ns(med), ns(p99)),
            format!("raw unary {}", ns(raw_med)),
            format!("{:.2}x", med as f64 / raw_med.max(1) as f64),
            Target::at_most(med as f64, 1.2 * raw_med as f64, "<= 1.2x raw unary"),
        );
        report.row(
            &format!("{what} median vs polled raw"),
            ns(med),
            format!("polled raw {}", ns(polled_med)),
            format!("{:.2}x", med as f64 / polled_med.max(1) as f64),
            None,
        );
        report.row(
            &format!("{what} round trip  median, absolute"),
            ns(med),
            "go-plugin 71.0 µs".into(),
            format!("{:.2}x", med as f64 / 71_000.0),
            Target::at_most(med as f64, 42_600.0, "<= 0.6x go-plugin = 42.6 µs"),
        );
    }
    Ok(())
}

/// `pim-bench spawn <ballast MiB> <on|off> <n>`: in a fresh process that
/// first grows its RSS by the ballast (touched), spawns the echo sidecar `n`
/// times with the sandbox on or off and prints
/// `spawn <rss KiB> <median ns> <max ns>`.
async fn spawn_probe(ballast_mib: usize, sandbox: bool, n: usize) -> anyhow::Result<()> {
    let ballast: Vec<u8> = vec![1u8; ballast_mib << 20];
    std::hint::black_box(&ballast);
    let dir = tempfile::Builder::new()
        .prefix("pim-bench-spawn-")
        .tempdir()?;
    let echo = echo_sidecar()?;
    let mut times = Vec::new();
    for i in 0..n {
        let mut config = SidecarConfig::spawn(
            "echo",
            ["echo.ping", "echo.pong"],
            dir.path().join(format!("sock{i}")),
            CommandSpec::new(&echo),
        );
        config.stuck_timeout = None;
        if !sandbox {
            config.sandbox = Sandbox::off();
        }
        let started = Instant::now();
        let host = start_host(config, dir.path()).await?;
        times.push(started.elapsed().as_nanos() as u64);
        host.stop().await;
    }
    let (med, max) = median_p99(&mut times);
    println!("spawn {} {med} {max}", status_kib("VmRSS:"));
    drop(ballast);
    Ok(())
}

/// The examples' echo sidecar, the program the spawn phase starts: its
/// path is resolved (and the binary built, under cargo) once, by the parent,
/// and handed to each probe process in `PIM_BENCH_ECHO`.
fn echo_sidecar() -> anyhow::Result<std::path::PathBuf> {
    match std::env::var_os("PIM_BENCH_ECHO") {
        Some(path) => Ok(path.into()),
        None => pim_sidecar_examples::example_bin("echo-sidecar"),
    }
}

/// Runs one spawn probe; returns (RSS KiB, median ns, max ns).
async fn run_spawn_probe(
    ballast_mib: usize,
    sandbox: bool,
    n: usize,
) -> anyhow::Result<(u64, u64, u64)> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.env("PIM_BENCH_ECHO", echo_sidecar()?).args([
        "spawn",
        &ballast_mib.to_string(),
        if sandbox { "on" } else { "off" },
        &n.to_string(),
    ]);
    let line = crate::stats::probe_line(command, "spawn ", "the spawn probe").await?;
    let f = crate::stats::numbers(&line);
    anyhow::ensure!(f.len() == 3, "the spawn probe printed {line}");
    Ok((f[0], f[1], f[2]))
}

async fn spawn_to_registered(report: &mut Report, scale: Scale) -> anyhow::Result<()> {
    println!(
        "\n# spawn -> registered, the Rust echo sidecar (each row: the median of 5 fresh daemon processes x {} starts, interleaved)",
        scale.spawns
    );
    let ballast = if scale.spawns > 2 { 1024 } else { 64 };
    // Rounds alternate between the three daemons, so that a slow moment of
    // the machine falls on all of them; each figure is the median of the
    // rounds' medians.
    let rounds = if scale.spawns > 2 { 5 } else { 1 };
    let mut runs: [Vec<(u64, u64, u64)>; 3] = Default::default();
    for _ in 0..rounds {
        runs[0].push(run_spawn_probe(0, true, scale.spawns).await?);
        runs[1].push(run_spawn_probe(ballast, true, scale.spawns).await?);
        runs[2].push(run_spawn_probe(0, false, scale.spawns).await?);
    }
    let pick = |runs: &mut Vec<(u64, u64, u64)>| {
        runs.sort_by_key(|r| r.1);
        runs[runs.len() / 2]
    };
    let (small_rss, small, small_max) = pick(&mut runs[0]);
    let (big_rss, big, big_max) = pick(&mut runs[1]);
    let (_, off, off_max) = pick(&mut runs[2]);
    report.row(
        &format!(
            "sandbox on, daemon RSS {} MiB  median / max",
            small_rss / 1024
        ),
        format!("{} / {}", ns(small), ns(small_max)),
        format!("sandbox off {} / {}", ns(off), ns(off_max)),
        format!("{:.2}x", small as f64 / off.max(1) as f64),
        Target::at_most(small as f64, 2_000_000.0, "<= 2 ms"),
    );
    report.row(
        &format!(
            "sandbox on, daemon RSS {} MiB  median / max",
            big_rss / 1024
        ),
        format!("{} / {}", ns(big), ns(big_max)),
        format!("RSS {} MiB {}", small_rss / 1024, ns(small)),
        format!("{:.2}x", big as f64 / small.max(1) as f64),
        Target::at_most(
            big as f64 / small.max(1) as f64,
            1.10,
            "<= 1.10x the small daemon (flat)",
        ),
    );
    Ok(())
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `pim-bench memory <bound MiB> [plugins]`: in a fresh process, `plugins`
/// stalled sidecars (1 by default), each queue bounded at `bound` MiB; with
/// more than one, they share a [`pim_plugin_bridge::QueueBudget`] of
/// `bound` MiB. Pushes 3x the bound to each, round robin, and prints
/// `rss <baseline KiB> <peak KiB> <bound KiB>`.
async fn memory_probe(bound_mib: usize, plugins: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("pim-bench-mem-")
        .tempdir()?;
    let budget = (plugins > 1).then(|| pim_plugin_bridge::QueueBudget::new(bound_mib << 20));
    let mut hosts = Vec::new();
    for i in 0..plugins.max(1) {
        let mut config = sidecar_config(dir.path(), &format!("-mem{i}"), true);
        config.name = format!("mem{i}");
        config.payload_kinds = ["data", "cmd", "ping"]
            .map(|k| format!("mem{i}.{k}"))
            .to_vec();
        config.queue.max_events = 1 << 22;
        config.queue.max_bytes = bound_mib << 20;
        config.queue_budget = budget.clone();
        config.shutdown_grace = Duration::from_millis(100);
        config.term_grace = Duration::from_millis(100);
        hosts.push(start_host(config, dir.path()).await?);
    }
    let baseline = status_kib("VmRSS:");
    let src = NodeId::from_bytes([2; 16]);
    let body = vec![3u8; 1024];
    let total = 3 * (bound_mib << 20) / 1024;
    for _ in 0..total {
        for host in &hosts {
            host.plugin
                .handle_payload(src, &host.data, Bytes::copy_from_slice(&body))
                .await;
        }
    }
    for host in &hosts {
        let stats = host.plugin.stats();
        anyhow::ensure!(stats.queue.dropped_overflow > 0, "a queue never filled");
        anyhow::ensure!(
            budget.is_none() || stats.queue.dropped_budget > 0,
            "the budget never bound"
        );
    }
    let peak = status_kib("VmHWM:");
    println!("rss {baseline} {peak} {}", bound_mib * 1024);
    for host in hosts {
        host.stop().await;
    }
    Ok(())
}

async fn memory(report: &mut Report, smoke: bool) -> anyhow::Result<()> {
    let bound_mib = if smoke { 8 } else { 64 };
    println!("\n# daemon-side memory with stalled sidecars and full queues ({bound_mib} MiB bound, 1 KiB payloads, 3x the bound pushed to each)");
    let growth = memory_run(bound_mib, 1).await?;
    report.row(
        "peak RSS growth with a full queue",
        format!("{:.1} MiB", growth as f64 / 1024.0),
        format!("bound {bound_mib} MiB"),
        format!("{:.2}x", growth as f64 / (bound_mib * 1024) as f64),
        Target::at_most(
            growth as f64,
            1.1 * (bound_mib * 1024) as f64,
            "<= bound + 10%",
        ),
    );
    // Four plugins, each bounded at `bound`, sharing a budget of `bound`:
    // without the budget they could hold 4x. What the queues do not count
    // (each plugin's connection, its stream's messages in flight, its
    // server) is about 2 MiB per plugin.
    let plugins = 4;
    let growth = memory_run(bound_mib, plugins).await?;
    let allowed = 1.1 * (bound_mib * 1024) as f64 + (plugins * 2048) as f64;
    report.row(
        &format!("  {plugins} stalled, sharing a queue budget"),
        format!("{:.1} MiB", growth as f64 / 1024.0),
        format!("budget {bound_mib} MiB"),
        format!("{:.2}x", growth as f64 / (bound_mib * 1024) as f64),
        Target::at_most(
            growth as f64,
            allowed,
            "<= budget + 10% + 2 MiB a plugin; own bounds 4x budget",
        ),
    );
    Ok(())
}

/// Runs the memory probe in a fresh process; the peak RSS growth, KiB.
async fn memory_run(bound_mib: usize, plugins: usize) -> anyhow::Result<u64> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args(["memory", &bound_mib.to_string(), &plugins.to_string()]);
    let line = crate::stats::probe_line(command, "rss ", "the memory probe").await?;
    let f = crate::stats::numbers(&line);
    anyhow::ensure!(f.len() == 3, "unexpected memory probe output: {line}");
    Ok(f[1].saturating_sub(f[0]))
}

async fn bench(smoke: bool) -> anyhow::Result<Report> {
    let scale = if smoke { SMOKE } else { FULL };
    let dir = tempfile::Builder::new().prefix("pim-bench-").tempdir()?;
    let mut report = Report {
        rows: 0,
        smoke,
        missed: Vec::new(),
    };
    println!(
        "pim-bench: {} run, {} cores, {}",
        if smoke {
            "smoke (tiny counts, no targets)"
        } else {
            "full"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) {
            "DEBUG build: figures are not meaningful"
        } else {
            "release build"
        }
    );
    println!(
        "{:<44} {:>22} {:>22} {:>8}  target",
        "measure", "value", "floor", "ratio"
    );
    let only = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .unwrap_or_default();
    let run = |phase: &str| only.is_empty() || only == phase;
    // Spawn first: a fork copies the daemon's page tables, so the figure
    // depends on the daemon's size; here it is a small daemon at start-up
    // (the row says how big), not one that just ran a million-event burst.
    if run("spawn") {
        spawn_to_registered(&mut report, scale).await?;
    }
    if run("cost") {
        handle_payload_cost(&mut report, scale, dir.path()).await?;
    }
    let mut max_rate = 1_000_000.0;
    if run("throughput") || run("latency") {
        max_rate = throughput(&mut report, scale, dir.path()).await?;
    }
    if run("latency") {
        latency(&mut report, scale, dir.path(), max_rate).await?;
    }
    if run("sustainable") {
        if !(run("throughput") || run("latency")) {
            max_rate = throughput(&mut report, scale, dir.path()).await?;
        }
        sustainable(&mut report, smoke, dir.path(), max_rate).await?;
    }
    if run("rtt") {
        round_trips(&mut report, scale, dir.path()).await?;
    }
    if run("e2e") {
        e2e::end_to_end(&mut report, scale, dir.path()).await?;
    }
    if run("python") {
        python::python(&mut report, scale, dir.path()).await?;
    }
    if run("memory") {
        memory(&mut report, smoke).await?;
    }
    if run("many") {
        many::many(&mut report, smoke).await?;
    }
    Ok(report)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sidecar") => return sidecar::main(),
        Some("raw-echo-client") => {
            return match raw_echo::client(args.get(1).map_or("", String::as_str)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("raw echo client: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("floor-client") => {
            let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(0);
            let latency = args.get(3).map(String::as_str) == Some("latency");
            return match sidecar::floor_client(args.get(1).map_or("", String::as_str), n, latency) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("floor client: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.first().map(String::as_str) == Some("spawn") {
        let num =
            |i: usize, default: usize| args.get(i).and_then(|n| n.parse().ok()).unwrap_or(default);
        let sandbox = args.get(2).map(String::as_str) != Some("off");
        return match runtime.block_on(spawn_probe(num(1, 0), sandbox, num(3, 20))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spawn probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("many") {
        let arg = |i: usize| {
            args.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(1.0)
        };
        return match runtime.block_on(many::probe(arg(1) as usize, arg(2), arg(3) as u64)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("many-sidecars probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("at") {
        let arg = |i: usize, default: f64| {
            args.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(default)
        };
        return match runtime.block_on(at_rate(
            arg(1, 64.0) as usize,
            arg(2, 1000.0),
            arg(3, 3.0) as usize,
        )) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("at: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("memory") {
        let mib = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(64);
        let plugins = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
        return match runtime.block_on(memory_probe(mib, plugins)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("memory probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    match runtime.block_on(bench(smoke)) {
        Ok(report) => {
            println!();
            if smoke {
                println!(
                    "smoke run: {} figures printed, no targets checked",
                    report.rows
                );
            } else if report.missed.is_empty() {
                println!("every target met");
            } else {
                println!("targets missed ({}):", report.missed.len());
                for m in &report.missed {
                    println!("  {m}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pim-bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
