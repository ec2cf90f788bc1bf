//! Running an unchanged in-process `pim_plugin::DaemonPlugin` out of process.
//!
//! [`HostPorts`] implements the `pim-plugin` ports over the host RPCs, and
//! [`run_daemon_plugin`] drives any `Arc<dyn DaemonPlugin>` from the Events
//! stream with a real `PluginContext` built from them.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::{
    ControlSender, DaemonPlugin, IdentitySecrets, PeerDirectory, PeerDirectoryEvent, PluginContext,
};
use pim_plugin_proto::convert::WatchEvent;
use pim_plugin_proto::pb::Capability;
use pim_protocol::ControlFrame;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::{Context, HostClient, Sidecar};

/// The `pim-plugin` ports of a sidecar, backed by the host's RPCs.
///
/// `subscribe()` is fed by one `Watch` stream (opened again after a
/// reconnect). The signing seed is fetched once at start, because
/// `IdentitySecrets::signing_seed` is synchronous, and wiped on drop.
pub struct HostPorts {
    host: HostClient,
    events: broadcast::Sender<PeerDirectoryEvent>,
    seed: Option<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for HostPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPorts")
            .field("host", &self.host)
            .field("seed", &self.seed.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl HostPorts {
    /// Ports over `ctx.host`: fetches the seed when it was granted, and
    /// feeds `subscribe()` from a Watch stream until `ctx.cancel`.
    pub async fn start(ctx: &Context) -> anyhow::Result<Arc<Self>> {
        let seed = if ctx.granted.contains(&Capability::SigningSeed) {
            Some(Zeroizing::new(ctx.host.signing_seed().await?))
        } else {
            None
        };
        let (events, _) = broadcast::channel(1024);
        let ports = Arc::new(Self {
            host: ctx.host.clone(),
            events,
            seed,
        });
        tokio::spawn(feed_watch(
            ctx.host.clone(),
            ports.events.clone(),
            ctx.cancel.clone(),
        ));
        Ok(ports)
    }

    /// A `PluginContext` of these ports.
    pub fn context(self: &Arc<Self>, ctx: &Context) -> PluginContext {
        PluginContext {
            peers: self.clone(),
            control: self.clone(),
            identity: self.clone(),
            data_dir: ctx.data_dir.clone(),
            cancel: ctx.cancel.clone(),
        }
    }
}

/// Forwards the host's Watch stream into `events`, reopening it after the
/// connection comes back, until `cancel`.
async fn feed_watch(
    host: HostClient,
    events: broadcast::Sender<PeerDirectoryEvent>,
    cancel: CancellationToken,
) {
    let mut backoff = pim_plugin_proto::backoff::Backoff::reconnect();
    while !cancel.is_cancelled() {
        let watch = tokio::select! {
            w = host.watch() => w,
            () = cancel.cancelled() => return,
        };
        match watch {
            Ok(mut watch) => {
                backoff.reset();
                loop {
                    let next = tokio::select! {
                        n = watch.next() => n,
                        () = cancel.cancelled() => return,
                    };
                    match next {
                        Ok(Some(WatchEvent::Peer(ev))) => {
                            let _ = events.send(ev);
                        }
                        Ok(Some(WatchEvent::Lagged { missed })) => {
                            tracing::warn!(missed, "peer directory watch lagged")
                        }
                        // A kind of change the pim-plugin ports cannot express.
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("peer directory watch ended: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("peer directory watch not open yet: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_pause()) => {}
            () = cancel.cancelled() => return,
        }
    }
}

#[async_trait]
impl PeerDirectory for HostPorts {
    async fn lookup_x25519(&self, peer: &NodeId) -> Option<[u8; 32]> {
        self.host.lookup_x25519(peer).await.unwrap_or_else(|e| {
            tracing::warn!(%peer, "LookupX25519 failed: {e}");
            None
        })
    }

    async fn lookup_name(&self, peer: &NodeId) -> Option<String> {
        self.host.lookup_name(peer).await.unwrap_or_else(|e| {
            tracing::warn!(%peer, "LookupName failed: {e}");
            None
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<PeerDirectoryEvent> {
        self.events.subscribe()
    }
}

#[async_trait]
impl ControlSender for HostPorts {
    async fn send_direct(&self, peer: NodeId, frame: ControlFrame) {
        // Best effort, as the trait says: failures are logged.
        if let Err(e) = self.host.send_direct(peer, frame).await {
            tracing::warn!(%peer, "SendDirect failed: {e}");
        }
    }

    async fn send_routed(&self, dst: NodeId, frame: ControlFrame) -> bool {
        self.host.send_routed(dst, frame).await.unwrap_or_else(|e| {
            tracing::warn!(%dst, "SendRouted failed: {e}");
            false
        })
    }
}

impl IdentitySecrets for HostPorts {
    /// # Panics
    ///
    /// If the host did not grant SIGNING_SEED: the synchronous trait has no
    /// way to report it, and a wrong seed would silently break crypto.
    /// [`DaemonPluginSidecar::requires_signing_seed`] turns this into a clear
    /// start-up error instead.
    fn signing_seed(&self) -> [u8; 32] {
        match &self.seed {
            Some(seed) => **seed,
            None => panic!(
                "IdentitySecrets::signing_seed called, but the host did not grant SIGNING_SEED to this plugin (add grants = [\"signing_seed\"] to its sidecar config)"
            ),
        }
    }
}

type Factory = Box<dyn Fn(&PluginContext) -> anyhow::Result<Arc<dyn DaemonPlugin>> + Send + Sync>;

/// A [`Sidecar`] that runs an in-process `DaemonPlugin` unchanged.
///
/// The plugin is built by a factory that receives the host-backed
/// `PluginContext`, because many plugins take their ports at construction
/// (like `pim_messaging::MessagingService::open`). Its `start`,
/// `handle_payload`, `on_peer_forgotten` and `shutdown` are then driven
/// from the Events stream; the context's `cancel` fires at Shutdown.
pub struct DaemonPluginSidecar {
    name: &'static str,
    kinds: &'static [&'static str],
    factory: Factory,
    needs_seed: bool,
    plugin: OnceLock<Arc<dyn DaemonPlugin>>,
}

impl std::fmt::Debug for DaemonPluginSidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonPluginSidecar")
            .field("name", &self.name)
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl DaemonPluginSidecar {
    /// A sidecar named `name` claiming `kinds`, whose plugin `factory` builds
    /// at start. The plugin must report the same name and kinds.
    pub fn new(
        name: &'static str,
        kinds: &'static [&'static str],
        factory: impl Fn(&PluginContext) -> anyhow::Result<Arc<dyn DaemonPlugin>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            name,
            kinds,
            factory: Box::new(factory),
            needs_seed: false,
            plugin: OnceLock::new(),
        }
    }

    /// A sidecar for a plugin that is already built.
    pub fn from_plugin(plugin: Arc<dyn DaemonPlugin>) -> Self {
        let (name, kinds) = (plugin.name(), plugin.payload_kinds());
        Self::new(name, kinds, move |_| Ok(plugin.clone()))
    }

    /// Fails at start, with a message saying what to grant, when the host
    /// did not grant SIGNING_SEED (for plugins that decrypt or sign).
    #[must_use]
    pub fn requires_signing_seed(mut self, yes: bool) -> Self {
        self.needs_seed = yes;
        self
    }

    /// The plugin `start` built; an error for an event before `start`,
    /// which [`crate::run`] never delivers but a caller driving this
    /// `Sidecar` by hand could.
    fn plugin(&self) -> anyhow::Result<&Arc<dyn DaemonPlugin>> {
        self.plugin
            .get()
            .ok_or_else(|| anyhow::anyhow!("an event before start: call start first"))
    }
}

#[async_trait]
impl Sidecar for DaemonPluginSidecar {
    fn name(&self) -> &str {
        self.name
    }

    fn payload_kinds(&self) -> &[&str] {
        self.kinds
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        if self.needs_seed && !ctx.granted.contains(&Capability::SigningSeed) {
            return Err(crate::RegisterRefused(format!(
                "plugin `{}` needs the node's signing seed, but the host did not grant SIGNING_SEED: add grants = [\"signing_seed\"] to its sidecar config",
                self.name
            ))
            .into());
        }
        let ports = HostPorts::start(&ctx).await?;
        let plugin_ctx = ports.context(&ctx);
        let plugin = (self.factory)(&plugin_ctx)?;
        if plugin.name() != self.name || plugin.payload_kinds() != self.kinds {
            anyhow::bail!(
                "the plugin built reports name `{}` and kinds {:?}, but the sidecar registered `{}` with {:?}",
                plugin.name(),
                plugin.payload_kinds(),
                self.name,
                self.kinds
            );
        }
        plugin.clone().start(plugin_ctx).await?;
        let _ = self.plugin.set(plugin);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        self.plugin()?.handle_payload(src, kind, body).await;
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        match self.plugin() {
            Ok(plugin) => plugin.on_peer_forgotten(peer).await,
            Err(e) => tracing::warn!("peer forgotten: {e}"),
        }
    }

    async fn shutdown(&self) {
        if let Some(plugin) = self.plugin.get() {
            plugin.shutdown().await;
        }
    }
}

/// Runs an in-process plugin as this process's sidecar: [`crate::run`] of a
/// [`DaemonPluginSidecar`].
pub fn run_daemon_plugin(sidecar: DaemonPluginSidecar) -> ExitCode {
    crate::run(sidecar)
}
