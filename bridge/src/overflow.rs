//! Rate-limited logging of dropped payloads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::queue::EventQueue;

/// Seconds since the epoch of the last overflow log line, across plugins.
static LAST_LOG_SECS: AtomicU64 = AtomicU64::new(0);

/// Logs that `plugin` dropped payloads, at most once a second.
pub(crate) fn report(plugin: &'static str, queue: &EventQueue) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOG_SECS.load(Ordering::Relaxed);
    if now > last
        && LAST_LOG_SECS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let stats = queue.stats();
        tracing::warn!(
            plugin,
            dropped_total = stats.dropped_overflow,
            dropped_for_budget = stats.dropped_budget,
            depth = stats.depth,
            bytes = stats.bytes,
            "event queue full (its own bounds, or above its share of the daemon-wide queue budget): dropped the oldest payloads (is the sidecar slow or stuck?)"
        );
    }
}
