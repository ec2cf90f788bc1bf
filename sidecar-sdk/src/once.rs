//! Effects once: the event a handler runs for, a handler's "retry", and
//! the position a plugin has applied durably.
//!
//! Delivery is at least once: an event handled but not yet acked when the
//! process dies is delivered again to the next one. A plugin whose effect
//! must happen once commits, in one transaction, its effect and the
//! event's `seq` and `host_instance` ([`EventInfo::current`]), and returns
//! that position from [`crate::Sidecar::applied`]: after every Register the
//! SDK skips (and acks) every event up to it.

use std::future::Future;
use std::sync::Arc;

/// The event a handler is running for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventInfo {
    /// Its sequence number, increasing within one `host_instance`.
    pub seq: u64,
    /// The run of the host that numbered it: sequence numbers of different
    /// instances are not comparable.
    pub host_instance: Arc<str>,
}

tokio::task_local! {
    static CURRENT: EventInfo;
}

impl EventInfo {
    /// The event being handled, inside [`crate::Sidecar::handle_payload`]
    /// and [`crate::Sidecar::on_peer_forgotten`] (and the futures they
    /// await); `None` anywhere else, such as a task they spawned.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

/// Runs a handler with `info` as its [`EventInfo::current`].
pub(crate) async fn scoped<F: Future>(info: EventInfo, handler: F) -> F::Output {
    CURRENT.scope(info, handler).await
}

/// The last event whose effect a plugin committed durably.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The `host_instance` of that event.
    pub host_instance: String,
    /// Its `seq`.
    pub seq: u64,
}

impl Applied {
    /// The position `seq` of host instance `host_instance`.
    pub fn new(host_instance: impl Into<String>, seq: u64) -> Self {
        Self {
            host_instance: host_instance.into(),
            seq,
        }
    }
}

/// A handler's error that means "not handled, try again": the SDK calls the
/// handler for the same event again, up to [`RETRIES`] more times with a
/// growing pause (50 ms, doubling), before it logs an error and moves on.
/// Any other error is logged and the event counts as handled.
///
/// ```
/// # async fn f() -> anyhow::Result<()> {
/// return Err(pim_sidecar::Retry::new("the database is locked").into());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Retry(String);

impl Retry {
    /// "Not handled" for `why`.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not handled, retry: {}", self.0)
    }
}

impl std::error::Error for Retry {}

/// How many times an event whose handler asked for a [`Retry`] is handed
/// to it again.
pub const RETRIES: u32 = 5;

/// The pauses between a handler's retries: 50 ms, doubling.
pub(crate) fn retry_backoff() -> pim_plugin_proto::backoff::Backoff {
    pim_plugin_proto::backoff::Backoff::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(2),
    )
}
