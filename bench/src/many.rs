//! Many sidecars on one daemon: what each idle plugin costs the daemon
//! (threads, memory, wake-ups, CPU), light-load latency beside idle
//! neighbours, how busy plugins share the daemon, and whether queue memory
//! is given back after a burst.
//!
//! Each count runs in a fresh daemon process (`pim-bench many <n> <idle
//! secs>`) so that no earlier phase's memory or threads are counted; the
//! sidecars are the bench sidecar (echo-like, written with the SDK and its
//! defaults) with the daemon's default settings (keepalive, stuck timer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::DaemonPlugin;
use pim_plugin_bridge::SidecarPlugin;

use super::{ns, sidecar_config, start_host, status_kib, Report, Target};
use crate::stats::{clock_ticks_per_second, sum, switches_and_ticks};

/// Pushes `n` 64 B payloads to `plugin` as fast as its queue drains (at
/// most 50,000 pending), then waits for the acks; returns the time taken.
async fn produce(plugin: Arc<SidecarPlugin>, kind: String, n: u64) -> Duration {
    let src = NodeId::from_bytes([2; 16]);
    let body = Bytes::from(vec![7u8; 64]);
    let base = plugin.progress().0;
    let started = Instant::now();
    for i in 0..n {
        if i % 1024 == 0 {
            while {
                let (newest, acked) = plugin.progress();
                newest - acked > 50_000
            } {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        plugin.handle_payload(src, &kind, body.clone()).await;
    }
    while plugin.progress().1 < base + n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    started.elapsed()
}

/// `pim-bench many <n> <idle secs>`: in a fresh process, hosts `n` bench
/// sidecars and prints one `many key=value …` line.
pub(crate) async fn probe(n: usize, idle_secs: f64, payloads: u64) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("pim-bench-many-")
        .tempdir()?;
    let rss_empty = status_kib("VmRSS:");
    let mut hosts = Vec::new();
    for i in 0..n {
        let mut config = sidecar_config(dir.path(), &format!("-m{i}"), false);
        config.name = format!("m{i}");
        config.payload_kinds = vec![
            format!("m{i}.data"),
            format!("m{i}.cmd"),
            format!("m{i}.ping"),
        ];
        // The daemon's defaults for what runs while idle.
        config.stuck_timeout = Some(Duration::from_secs(30));
        config.queue = Default::default();
        hosts.push(start_host(config, dir.path()).await?);
    }
    // Let registration traffic and first acks settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let threads = status_kib("Threads:");
    let rss = status_kib("VmRSS:");
    let me = std::process::id();
    let sidecars: Vec<u32> = hosts.iter().filter_map(|h| h.plugin.pid()).collect();
    anyhow::ensure!(
        sidecars.len() == n,
        "{} of {n} sidecars run",
        sidecars.len()
    );
    let (d0, dt0) = switches_and_ticks(me);
    let (s0, st0) = sum(&sidecars);
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let (d1, dt1) = switches_and_ticks(me);
    let (s1, st1) = sum(&sidecars);
    let hz = clock_ticks_per_second();
    let daemon_wakes = (d1 - d0) as f64 / idle_secs;
    let sidecar_wakes = (s1 - s0) as f64 / idle_secs;
    let cpu = ((dt1 - dt0) + (st1 - st0)) as f64 / hz / idle_secs * 100.0;

    // Light load on the first plugin beside the idle others.
    let ticks = (idle_secs.min(2.0) * 1000.0) as u64;
    let lat = light_load(&mut hosts[0], ticks).await?;

    // The same beside a sidecar that never returns from its handler while
    // it is flooded (its queue fills and drops, bounded).
    let mut stalled_config = sidecar_config(dir.path(), "-stalled", true);
    stalled_config.name = "stalled".into();
    stalled_config.payload_kinds = vec![
        "stalled.data".into(),
        "stalled.cmd".into(),
        "stalled.ping".into(),
    ];
    stalled_config.queue = Default::default();
    stalled_config.shutdown_grace = Duration::from_millis(100);
    stalled_config.term_grace = Duration::from_millis(100);
    let stalled = start_host(stalled_config, dir.path()).await?;
    let flood = {
        let plugin = stalled.plugin.clone();
        tokio::spawn(async move {
            let src = NodeId::from_bytes([3; 16]);
            let body = Bytes::from(vec![9u8; 1024]);
            loop {
                for _ in 0..100 {
                    plugin
                        .handle_payload(src, "stalled.data", body.clone())
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let lat_stalled = light_load(&mut hosts[0], ticks).await?;
    flood.abort();
    let dropped = stalled.plugin.stats().queue.dropped_overflow;
    stalled.stop().await;

    // Busy: one alone, then up to 8 at once.
    let busy = n.min(8);
    let alone = produce(hosts[0].plugin.clone(), hosts[0].data.clone(), payloads).await;
    let rss_before_burst = status_kib("VmRSS:");
    // Resets the peak (VmHWM) to the current RSS, so the peak read after the
    // burst is the burst's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let bases: Vec<u64> = hosts[..busy]
        .iter()
        .map(|h| h.plugin.progress().1)
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = hosts[..busy]
        .iter()
        .map(|h| tokio::spawn(produce(h.plugin.clone(), h.data.clone(), payloads)))
        .collect();
    // The shares while all of them are busy: at the moment the first is done.
    let shares = loop {
        let done: Vec<u64> = hosts[..busy]
            .iter()
            .zip(&bases)
            .map(|(h, b)| h.plugin.progress().1 - b)
            .collect();
        if done.iter().any(|&d| d >= payloads) {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    for task in tasks {
        task.await?;
    }
    let together = started.elapsed();
    let total: u64 = shares.iter().sum();
    let smallest = shares.iter().copied().min().unwrap_or(0) as f64 / total.max(1) as f64;
    let rss_peak = status_kib("VmHWM:").max(rss_before_burst);
    // Given back? After the burst drained and a few seconds idle.
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let rss_after = status_kib("VmRSS:");
    println!(
        "many n={n} threads={threads} rss_empty={rss_empty} rss={rss} daemon_wakes={daemon_wakes:.2} \
         sidecar_wakes={sidecar_wakes:.2} cpu={cpu:.3} lat_median={} lat_p99={} busy={busy} \
         alone_rate={:.0} together_rate={:.0} smallest_share={smallest:.4} \
         rss_before_burst={rss_before_burst} rss_peak={rss_peak} rss_after={rss_after} \
         stalled_median={} stalled_p99={} stalled_dropped={dropped}",
        lat.0,
        lat.1,
        payloads as f64 / alone.as_secs_f64(),
        (busy as u64 * payloads) as f64 / together.as_secs_f64(),
        lat_stalled.0,
        lat_stalled.1,
    );
    for host in hosts {
        host.stop().await;
    }
    Ok(())
}

/// 64 B payloads to `host` at 1,000/s for `ticks` ms; the sidecar's
/// delivery latency, `(median, p99)` ns.
async fn light_load(host: &mut super::Host, ticks: u64) -> anyhow::Result<(u64, u64)> {
    super::ours_at(host, 64, 1000.0, ticks as f64 / 1000.0, true)
        .await?
        .latency
        .ok_or_else(|| anyhow::anyhow!("the sidecar fell behind at 1,000/s"))
}

/// The probe's figures for one count.
struct Figures(Vec<(String, f64)>);

impl Figures {
    fn get(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0.0, |(_, v)| *v)
    }
}

async fn run_probe(n: usize, idle_secs: f64, payloads: u64) -> anyhow::Result<Figures> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args([
        "many",
        &n.to_string(),
        &idle_secs.to_string(),
        &payloads.to_string(),
    ]);
    let what = format!("the many-sidecars probe ({n})");
    let line = crate::stats::probe_line(command, "many ", &what).await?;
    Ok(Figures(
        line.split(' ')
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    ))
}

/// The phase: each count in a fresh daemon, figures against one sidecar
/// alone (the floor measured in the same run).
pub(crate) async fn many(report: &mut Report, smoke: bool) -> anyhow::Result<()> {
    let (counts, idle_secs, payloads): (&[usize], f64, u64) = if smoke {
        (&[1, 2], 0.3, 2_000)
    } else {
        (&[1, 8, 32, 64], 5.0, 200_000)
    };
    println!(
        "\n# many sidecars on one daemon (a fresh daemon per count; idle figures over {idle_secs} s)"
    );
    let mut one: Option<Figures> = None;
    for &n in counts {
        let f = run_probe(n, idle_secs, payloads).await?;
        let base = one.get_or_insert_with(|| Figures(f.0.clone()));
        let threads = f.get("threads");
        report.row(
            &format!("daemon threads, {n} sidecars"),
            format!("{threads:.0}"),
            format!("1 sidecar {:.0}", base.get("threads")),
            format!("{:.2}x", threads / base.get("threads").max(1.0)),
            Target::at_most(threads, base.get("threads"), "no growth"),
        );
        // Per sidecar: what each one beyond the first adds (the first also
        // starts the shared socket-server threads).
        let rss = |f: &Figures| f.get("rss") - f.get("rss_empty");
        let wakes = |f: &Figures| f.get("daemon_wakes") + f.get("sidecar_wakes");
        if n == 1 {
            report.row(
                "  daemon RSS with 1 idle sidecar",
                format!("+{:.0} KiB", rss(&f)),
                format!("daemon alone {:.1} MiB", f.get("rss_empty") / 1024.0),
                String::new(),
                None,
            );
            report.row(
                "  idle wake-ups/s, daemon and 1 sidecar",
                format!("{:.2}", wakes(&f)),
                format!("sidecar {:.2}", f.get("sidecar_wakes")),
                String::new(),
                None,
            );
        } else {
            let per_plugin = (rss(&f) - rss(base)).max(0.0) / (n - 1) as f64;
            report.row(
                &format!("  daemon RSS per idle sidecar, {n}"),
                format!("{per_plugin:.0} KiB"),
                format!("1 sidecar +{:.0} KiB", rss(base)),
                String::new(),
                Target::at_most(per_plugin, 256.0, "<= 256 KiB"),
            );
            let per_plugin = (wakes(&f) - wakes(base)).max(0.0) / (n - 1) as f64;
            report.row(
                &format!("  idle wake-ups/s per sidecar, {n}"),
                format!("{per_plugin:.3}"),
                format!(
                    "all {:.2} (sidecars {:.2})",
                    wakes(&f),
                    f.get("sidecar_wakes")
                ),
                String::new(),
                Target::at_most(per_plugin, 0.1, "<= 0.1"),
            );
        }
        report.row(
            &format!("  idle CPU, daemon and {n} sidecars"),
            format!("{:.3}%", f.get("cpu")),
            String::new(),
            String::new(),
            None,
        );
        let median = f.get("lat_median");
        report.row(
            &format!("  latency at 1,000/s beside {} idle", n - 1),
            format!("{} / {}", ns(median as u64), ns(f.get("lat_p99") as u64)),
            format!("alone {}", ns(base.get("lat_median") as u64)),
            format!("{:.2}x", median / base.get("lat_median").max(1.0)),
            None,
        );
        let stalled = f.get("stalled_median");
        report.row(
            &format!("  latency at 1,000/s beside a stalled, flooded one, {n}"),
            format!(
                "{} / {}",
                ns(stalled as u64),
                ns(f.get("stalled_p99") as u64)
            ),
            format!("beside idle {}", ns(median as u64)),
            format!("{:.2}x", stalled / median.max(1.0)),
            None,
        );
        if n > 1 {
            let busy = f.get("busy");
            let ratio = f.get("together_rate") / f.get("alone_rate").max(1.0);
            report.row(
                &format!("  {busy:.0} busy together, 64 B"),
                format!("{:.0} k/s", f.get("together_rate") / 1e3),
                format!("1 alone {:.0} k/s", f.get("alone_rate") / 1e3),
                format!("{ratio:.2}x"),
                Target::at_least(ratio, 1.3, ">= 1.3x one alone"),
            );
            let fair = 1.0 / busy;
            let share = f.get("smallest_share");
            report.row(
                &format!("  smallest share of {busy:.0} busy"),
                format!("{:.1}%", share * 100.0),
                format!("fair {:.1}%", fair * 100.0),
                format!("{:.2}x", share / fair),
                Target::at_least(share / fair, 0.85, ">= 0.85x fair"),
            );
        }
        let grown = f.get("rss_peak") - f.get("rss_before_burst");
        let kept = f.get("rss_after") - f.get("rss_before_burst");
        report.row(
            &format!("  RSS kept {idle_secs} s after a burst drained, {n}"),
            format!("{:.1} MiB", kept / 1024.0),
            format!("burst grew {:.1} MiB", grown / 1024.0),
            format!("{:.2}x", kept / grown.max(1.0)),
            Target::at_most(kept, 0.25 * grown.max(1024.0), "<= 25% of the growth"),
        );
    }
    Ok(())
}
