//! The `Sidecar` trait: the out-of-process mirror of `pim_plugin::DaemonPlugin`.

use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin_proto::pb::Capability;
use tokio_util::sync::CancellationToken;

use crate::HostClient;

/// What a sidecar gets at start.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Context {
    /// The daemon's ports.
    pub host: HostClient,
    /// Where the plugin keeps its files: a directory of its own,
    /// `<daemon data dir>/plugins/<name>/` (mode 0700), unless the daemon's
    /// configuration gives it another (`RegisterResponse.data_dir`).
    pub data_dir: PathBuf,
    /// Capabilities the host granted.
    pub granted: Vec<Capability>,
    /// Cancelled when the sidecar is shutting down; tie background tasks to it.
    pub cancel: CancellationToken,
}

/// A plugin that runs in its own process. [`crate::run`] drives it.
///
/// Events reach it one at a time, in order: the next payload is delivered
/// after `handle_payload` for the previous one returned. An event is
/// acknowledged once its handler returned, so an event whose handler was
/// interrupted by a crash is delivered again to the next process.
///
/// A plugin that counts the payloads each peer sends, forgets a peer the
/// daemon forgot, and keeps a background task until shutdown (its own
/// task, so this plugin also depends on `tokio`):
///
/// ```no_run
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// use pim_sidecar::{anyhow, async_trait, Bytes, Context, NodeId, Sidecar};
///
/// #[derive(Default)]
/// struct Counter {
///     seen: Mutex<HashMap<NodeId, u64>>,
/// }
///
/// #[async_trait]
/// impl Sidecar for Counter {
///     fn name(&self) -> &str {
///         "counter"
///     }
///
///     fn payload_kinds(&self) -> &[&str] {
///         &["counter.hit"]
///     }
///
///     async fn start(&self, ctx: Context) -> anyhow::Result<()> {
///         let (host, cancel) = (ctx.host, ctx.cancel);
///         std::fs::create_dir_all(&ctx.data_dir)?;
///         // A task of the plugin's own, ended at shutdown.
///         tokio::spawn(async move {
///             let Ok(mut watch) = host.watch().await else { return };
///             loop {
///                 tokio::select! {
///                     _ = cancel.cancelled() => break,
///                     event = watch.next() => match event {
///                         Ok(Some(event)) => eprintln!("INFO keystore: {event:?}"),
///                         _ => break,
///                     },
///                 }
///             }
///         });
///         Ok(())
///     }
///
///     async fn handle_payload(&self, src: NodeId, _kind: &str, _body: Bytes) -> anyhow::Result<()> {
///         *self.seen.lock().unwrap().entry(src).or_default() += 1;
///         Ok(())
///     }
///
///     async fn on_peer_forgotten(&self, peer: NodeId) {
///         self.seen.lock().unwrap().remove(&peer);
///     }
/// }
///
/// fn main() -> std::process::ExitCode {
///     pim_sidecar::run(Counter::default())
/// }
/// ```
#[async_trait]
pub trait Sidecar: Send + Sync + 'static {
    /// Plugin name; must equal the daemon's configuration (`PIM_PLUGIN_NAME`).
    fn name(&self) -> &str;

    /// Payload kinds handled; must equal the daemon's configuration.
    fn payload_kinds(&self) -> &[&str];

    /// Called once, after the first Register and before any event.
    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// Handles an inbound payload of one of [`Sidecar::payload_kinds`].
    /// An error is logged; the event still counts as handled, unless it is
    /// a [`crate::Retry`]: then the event is handed to it again (bounded).
    /// [`crate::EventInfo::current`] gives the event's `seq` and
    /// `host_instance`.
    ///
    /// Its future is boxed for every payload, so its size is a per-event
    /// cost: [`HostClient`] calls keep their state in a box of their own,
    /// and a rarely taken branch with large state of its own (kilobytes)
    /// is best awaited through `Box::pin` too.
    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()>;

    /// The daemon forgot `peer`: drop per-peer state.
    async fn on_peer_forgotten(&self, peer: NodeId) {
        let _ = peer;
    }

    /// The daemon is shutting the plugin down; the process exits after this.
    async fn shutdown(&self) {}

    /// The last event whose effect this plugin committed durably, for a
    /// plugin that stores its state together with the event's `seq` and
    /// `host_instance` ([`crate::EventInfo::current`]). Called after
    /// [`Sidecar::start`] and after every later Register: events of the
    /// same host instance up to it are skipped and acked, so each event's
    /// effect happens once across crashes. `None` (the default): every
    /// event not yet acked is delivered.
    async fn applied(&self) -> Option<crate::Applied> {
        None
    }
}
