//! Light load end to end: `handle_payload(<name>.ping)` in the daemon →
//! the sidecar's handler → one `LookupX25519` → `SendRouted(<name>.pong)`
//! arriving at the daemon's port (the echo pattern), at 1,000 pings/s
//! against the same back to back, beside the same hops over raw threads
//! and sockets (`raw_echo`); and what the SDK's busy poll of its port
//! calls costs in CPU, idle and at 1,000/s, against a sidecar without it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::SidecarPlugin;

use super::{ns, sidecar_config, start_host, Host, Report, Scale, Target};
use crate::stats::{clock_ticks_per_second, median_p99, mono_ns, sum};

/// CPU seconds (daemon and sidecar, all threads) from `pids`' clock ticks.
fn cpu_secs(pids: &[u32]) -> f64 {
    sum(pids).1 as f64 / clock_ticks_per_second()
}

/// One ping with the time it was sent in its first 8 bytes.
async fn ping(plugin: &SidecarPlugin, kind: &str) {
    let mut body = [0u8; 64];
    body[..8].copy_from_slice(&mono_ns().to_le_bytes());
    plugin
        .handle_payload(
            NodeId::from_bytes([3; 16]),
            kind,
            Bytes::copy_from_slice(&body),
        )
        .await;
}

/// Calls `send` `n` times at 1,000/s on the calling thread, sleeping
/// between calls, as a daemon's thread that each frame wakes. (A call that
/// is late is followed by the next at once, to keep the rate.)
pub(crate) fn at_1000_per_s(n: usize, mut send: impl FnMut()) {
    let start = std::time::Instant::now();
    for i in 0..n {
        let at = start + Duration::from_millis(i as u64);
        if let Some(wait) = at.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        send();
    }
}

/// `n` pings at 1,000/s from a thread of their own ([`at_1000_per_s`]).
///
/// Not from the bench's runtime: there each tick's timer, armed again
/// after the ping, woke the runtime's timer thread right after the ping
/// was sent, and on a machine that runs the whole ping on one CPU that
/// thread's turn was part of the measured time (docs/BENCHMARKS.md,
/// "One CPU at light load").
async fn pings_at_1000_per_s(host: &Host, n: usize) -> anyhow::Result<()> {
    let plugin = host.plugin.clone();
    let kind = host.ping.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _in_runtime = runtime.enter();
        at_1000_per_s(n, || at_once_or_block_on(ping(&plugin, &kind), &runtime));
    })
    .await?;
    Ok(())
}

/// Runs `fut` with one poll when it finishes at once (as `handle_payload`
/// always does: it enqueues, or drops and counts, and returns), else on
/// `runtime`: a daemon's loop awaits `handle_payload` inline, without the
/// setting up and tearing down of a `block_on` around each call, which
/// took 10 µs of the shared CPU after each ping here.
fn at_once_or_block_on<F: std::future::Future>(
    fut: F,
    runtime: &tokio::runtime::Handle,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => runtime.block_on(fut),
    }
}

/// The next pong's latency (ns) and whether it arrived on the CPU that the
/// sidecar's handler ran on; an error after 10 s.
async fn pong(host: &mut Host) -> anyhow::Result<(u64, bool)> {
    tokio::time::timeout(Duration::from_secs(10), host.pongs.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no pong within 10 s"))?
        .ok_or_else(|| anyhow::anyhow!("the bench sidecar went away"))
}

/// The (median, p99) of pongs' latencies, and the share that arrived on
/// the CPU that the sidecar's handler ran on.
fn latencies(pongs: Vec<(u64, bool)>) -> ((u64, u64), f64) {
    let same = pongs.iter().filter(|(_, same)| *same).count() as f64 / pongs.len().max(1) as f64;
    let mut ns: Vec<u64> = pongs.into_iter().map(|(ns, _)| ns).collect();
    (median_p99(&mut ns), same)
}

/// What one sidecar showed.
struct Run {
    /// Ping → pong back to back: (median, p99) ns.
    back_to_back: (u64, u64),
    /// The same at 1,000 pings/s.
    at_rate: (u64, u64),
    /// Daemon and sidecar CPU per ping at 1,000/s, µs.
    cpu_per_ping_us: f64,
    /// Daemon and sidecar CPU while idle, ms per second.
    idle_ms_per_s: f64,
    /// The share of pongs that arrived on the CPU that the sidecar's
    /// handler ran on: back to back, and at 1,000/s.
    same_cpu: (f64, f64),
}

async fn run(
    dir: &Path,
    suffix: &str,
    busy_poll_us: Option<u32>,
    n: usize,
    secs: f64,
) -> anyhow::Result<Run> {
    let mut config = sidecar_config(dir, suffix, false);
    if let Some(us) = busy_poll_us {
        if let pim_plugin_bridge::Launch::Spawn(command) = &mut config.launch {
            command
                .env
                .push((pim_sidecar::BUSY_POLL_ENV.into(), us.to_string().into()));
        }
    }
    let mut host = start_host(config, dir).await?;
    let pids: Vec<u32> = [std::process::id()]
        .into_iter()
        .chain(host.plugin.pid())
        .collect();
    // Warm up: connections, allocations, caches.
    for _ in 0..n.min(500) {
        ping(&host.plugin, &host.ping).await;
        pong(&mut host).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        ping(&host.plugin, &host.ping).await;
        samples.push(pong(&mut host).await?);
    }
    let (back_to_back, same_back_to_back) = latencies(samples);

    let idle = Duration::from_secs_f64(secs.min(2.0));
    let before = cpu_secs(&pids);
    tokio::time::sleep(idle).await;
    let idle_ms_per_s = (cpu_secs(&pids) - before) * 1e3 / idle.as_secs_f64();

    let ticks = (secs * 1000.0) as usize;
    let before = cpu_secs(&pids);
    pings_at_1000_per_s(&host, ticks).await?;
    let mut samples = Vec::with_capacity(ticks);
    for _ in 0..ticks {
        samples.push(pong(&mut host).await?);
    }
    let cpu_per_ping_us = (cpu_secs(&pids) - before) * 1e6 / ticks as f64;
    let (at_rate, same_at_rate) = latencies(samples);
    host.stop().await;
    Ok(Run {
        back_to_back,
        at_rate,
        cpu_per_ping_us,
        idle_ms_per_s,
        same_cpu: (same_back_to_back, same_at_rate),
    })
}

/// A row of a latency at 1,000/s beside the same back to back (ns) and
/// their ratio.
fn vs_back_to_back(
    report: &mut Report,
    label: &str,
    (at_rate, back_to_back): (u64, u64),
    target: Option<Target>,
) {
    report.row(
        label,
        ns(at_rate),
        format!("back to back {}", ns(back_to_back)),
        format!("{:.2}x", at_rate as f64 / back_to_back as f64),
        target,
    );
}

pub(crate) async fn end_to_end(
    report: &mut Report,
    scale: Scale,
    dir: &Path,
) -> anyhow::Result<()> {
    let secs = scale.latency_secs.max(0.2) * 2.5;
    let n = (secs * 1000.0) as usize;
    println!("\n# light load end to end: handle_payload(ping) -> the sidecar's LookupX25519 -> SendRouted(pong) at the daemon, 64 B; {n} pings back to back, then {secs} s at 1,000/s");
    let polling = run(dir, "-e2e", None, n, secs).await?;
    let quiet = run(dir, "-e2e-nopoll", Some(0), n, secs).await?;
    let (m, p) = polling.at_rate;
    let (bm, bp) = polling.back_to_back;
    vs_back_to_back(
        report,
        "ping -> lookup -> pong at 1,000/s, median",
        (m, bm),
        Target::at_most(m as f64, 1.5 * bm as f64, "<= 1.5x back to back"),
    );
    vs_back_to_back(report, "  p99", (p, bp), None);
    report.row(
        "  pings whose sidecar and daemon ran on one CPU, at 1,000/s",
        format!("{:.0}%", 100.0 * polling.same_cpu.1),
        format!("back to back {:.0}%", 100.0 * polling.same_cpu.0),
        String::new(),
        None,
    );
    let ((rbm, _), (rm, _)) = crate::raw_echo::measure(dir, n, (secs * 1000.0) as usize).await?;
    vs_back_to_back(
        report,
        "  floor: the same hops over raw threads and sockets",
        (rm, rbm),
        None,
    );
    vs_back_to_back(
        report,
        "  without the SDK's busy poll: at 1,000/s",
        (quiet.at_rate.0, quiet.back_to_back.0),
        None,
    );
    report.row(
        "CPU per ping at 1,000/s (daemon + sidecar)",
        format!("{:.1} µs", polling.cpu_per_ping_us),
        format!("no poll {:.1} µs", quiet.cpu_per_ping_us),
        if quiet.cpu_per_ping_us > 0.0 {
            format!("{:.2}x", polling.cpu_per_ping_us / quiet.cpu_per_ping_us)
        } else {
            String::new()
        },
        None,
    );
    // CPU time is counted in clock ticks: below one tick over the idle
    // time, say so rather than print a zero.
    let resolution = 1e3 / clock_ticks_per_second() / secs.min(2.0);
    let idle = |ms: f64| {
        if ms > 0.0 {
            format!("{ms:.1} ms/s")
        } else {
            format!("< {resolution:.0} ms/s")
        }
    };
    report.row(
        "CPU idle (daemon + sidecar)",
        idle(polling.idle_ms_per_s),
        format!("no poll {}", idle(quiet.idle_ms_per_s)),
        String::new(),
        None,
    );
    Ok(())
}
