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

/// Median and 99th percentile as "a b" (the wire form between processes).
pub(crate) fn encode(samples: &mut [u64]) -> String {
    let (m, p) = median_p99(samples);
    format!("{m} {p}")
}
