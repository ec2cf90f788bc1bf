//! Percentiles and the monotonic clock shared by both processes.

/// Nanoseconds of `CLOCK_MONOTONIC`: comparable across processes on one host.
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Median and 99th percentile of `samples` (sorted in place).
pub(crate) fn median_p99(samples: &mut [u64]) -> (u64, u64) {
    if samples.is_empty() {
        return (0, 0);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// The numbers after the first word of a reply or a probe's line
/// (`lat 123 456` → `[123, 456]`); words that are not numbers are skipped.
pub(crate) fn numbers(line: &str) -> Vec<u64> {
    line.split(' ')
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Runs `command` (a probe: a fresh `pim-bench <args>`, or a script) and
/// returns the line of its output that starts with `prefix`; the error
/// names `what` and carries all it printed.
pub(crate) async fn probe_line(
    mut command: tokio::process::Command,
    prefix: &str,
    what: &str,
) -> anyhow::Result<String> {
    let out = command.kill_on_drop(true).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{what} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Median and 99th percentile as "a b" (the wire form between processes).
pub(crate) fn encode(samples: &mut [u64]) -> String {
    let (m, p) = median_p99(samples);
    format!("{m} {p}")
}

/// Context switches (the wake-ups of a sleeping thread, and preemptions)
/// of every thread of `pid`, and its CPU time in clock ticks.
pub(crate) fn switches_and_ticks(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th,
    // stime the 13th of them.
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            at(11) + at(12)
        })
        .unwrap_or(0);
    (switches, ticks)
}

/// Sums [`switches_and_ticks`] over `pids`.
pub(crate) fn sum(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .map(|&p| switches_and_ticks(p))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// The kernel's clock ticks per second (the unit of `/proc/<pid>/stat`'s
/// CPU times).
pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The CPU the calling thread runs on (`u32::MAX` where unknown).
pub(crate) fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu takes no arguments and only reads the
    // thread's state.
    u32::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(u32::MAX)
}
