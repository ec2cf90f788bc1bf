//! An in-process fake daemon for testing a sidecar binary, in any language.
//!
//! [`FakeHost`] hosts one sidecar through a real [`SidecarPlugin`] (real
//! socket, real process) with ports that record every call. A test injects
//! payloads and peer events and waits for the plugin's reactions:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use pim_plugin_bridge::testkit::{FakeHost, NodeId, PortCall};
//! use pim_plugin_bridge::{CommandSpec, SidecarConfig};
//!
//! let dir = tempfile::tempdir()?;
//! let config = SidecarConfig::spawn("echo", ["echo.ping", "echo.pong"], dir.path().join("sock"),
//!     CommandSpec::new("target/debug/echo-sidecar"));
//! let host = FakeHost::start(config, dir.path()).await?;
//! let alice = NodeId::from_bytes([1; 16]);
//! host.ports().add_peer(alice, [7; 32], "alice");
//! host.inject_payload(alice, "echo.ping", "hi").await;
//! let call = host.ports().wait_for(Duration::from_secs(5), |c| matches!(c, PortCall::SendRouted { .. })).await?;
//! host.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pim_plugin::{
    ControlSender, DaemonPlugin, IdentitySecrets, PeerDirectory, PeerDirectoryEvent,
    PeerInfoSource, PluginContext,
};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::{SidecarConfig, SidecarPlugin};

pub use pim_core::NodeId;
pub use pim_protocol::ControlFrame;

/// Waits until `cond` holds, checking every 10 ms, for at most `timeout`;
/// the error names `what`.
pub async fn poll_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// One call a sidecar made into the daemon's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PortCall {
    /// `PeerDirectory::lookup_x25519`.
    LookupX25519 {
        /// Looked-up node.
        node: NodeId,
    },
    /// `PeerDirectory::lookup_name`.
    LookupName {
        /// Looked-up node.
        node: NodeId,
    },
    /// `PeerDirectory::subscribe` (a Watch stream was opened).
    Subscribe,
    /// `ControlSender::send_direct`.
    SendDirect {
        /// Destination.
        peer: NodeId,
        /// Frame sent.
        frame: ControlFrame,
    },
    /// `ControlSender::send_routed`.
    SendRouted {
        /// Destination.
        dst: NodeId,
        /// Frame sent.
        frame: ControlFrame,
        /// What the port answered.
        attempted: bool,
    },
    /// `IdentitySecrets::signing_seed`.
    SigningSeed,
}

#[derive(Debug, Clone)]
struct Peer {
    x25519: [u8; 32],
    name: String,
}

/// Daemon ports that record every call: a peer directory the test fills,
/// a control sender that routes to known peers only, and a fixed seed.
#[derive(Debug)]
pub struct RecordingPorts {
    peers: Mutex<HashMap<NodeId, Peer>>,
    events: broadcast::Sender<PeerDirectoryEvent>,
    calls: Mutex<Vec<PortCall>>,
    changed: Notify,
    seed: [u8; 32],
}

impl RecordingPorts {
    /// Empty ports whose signing seed is `seed`.
    pub fn new(seed: [u8; 32]) -> Arc<Self> {
        Arc::new(Self {
            peers: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
            calls: Mutex::new(Vec::new()),
            changed: Notify::new(),
            seed,
        })
    }

    fn record(&self, call: PortCall) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
        self.changed.notify_waiters();
    }

    /// Learns a peer and publishes `Seen` to watchers.
    pub fn add_peer(&self, node: NodeId, x25519: [u8; 32], name: &str) {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node,
            Peer {
                x25519,
                name: name.to_owned(),
            },
        );
        let _ = self.events.send(PeerDirectoryEvent::Seen {
            node_id: node,
            x25519_pub: x25519,
            name: name.to_owned(),
            via: PeerInfoSource::Direct,
        });
    }

    /// Forgets a peer and publishes `Forgotten` to watchers.
    pub fn forget_peer(&self, node: NodeId) {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node);
        let _ = self
            .events
            .send(PeerDirectoryEvent::Forgotten { node_id: node });
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<PortCall> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a recorded call matches `pred` and returns it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&PortCall) -> bool,
    ) -> anyhow::Result<PortCall> {
        self.wait_until(timeout, |calls| calls.iter().find(|c| pred(c)).cloned())
            .await
    }

    /// Waits until `check` over all recorded calls returns `Some`.
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        check: impl Fn(&[PortCall]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if let Some(found) = check(&self.calls.lock().unwrap_or_else(|e| e.into_inner())) {
                    return found;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            anyhow::anyhow!(
                "timed out after {timeout:?} waiting for the sidecar; calls so far: {:#?}",
                self.calls()
            )
        })
    }

    /// A `PluginContext` backed by these ports.
    pub fn context(self: &Arc<Self>, data_dir: &Path, cancel: CancellationToken) -> PluginContext {
        PluginContext {
            peers: self.clone(),
            control: self.clone(),
            identity: self.clone(),
            data_dir: data_dir.to_owned(),
            cancel,
        }
    }
}

#[async_trait]
impl PeerDirectory for RecordingPorts {
    async fn lookup_x25519(&self, peer: &NodeId) -> Option<[u8; 32]> {
        self.record(PortCall::LookupX25519 { node: *peer });
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map(|p| p.x25519)
    }

    async fn lookup_name(&self, peer: &NodeId) -> Option<String> {
        self.record(PortCall::LookupName { node: *peer });
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map(|p| p.name.clone())
    }

    fn subscribe(&self) -> broadcast::Receiver<PeerDirectoryEvent> {
        let rx = self.events.subscribe();
        self.record(PortCall::Subscribe);
        rx
    }
}

#[async_trait]
impl ControlSender for RecordingPorts {
    async fn send_direct(&self, peer: NodeId, frame: ControlFrame) {
        self.record(PortCall::SendDirect { peer, frame });
    }

    async fn send_routed(&self, dst: NodeId, frame: ControlFrame) -> bool {
        let attempted = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&dst);
        self.record(PortCall::SendRouted {
            dst,
            frame,
            attempted,
        });
        attempted
    }
}

impl IdentitySecrets for RecordingPorts {
    fn signing_seed(&self) -> [u8; 32] {
        self.record(PortCall::SigningSeed);
        self.seed
    }
}

/// A fake daemon hosting one sidecar through a real [`SidecarPlugin`].
#[derive(Debug)]
pub struct FakeHost {
    plugin: Arc<SidecarPlugin>,
    ports: Arc<RecordingPorts>,
    cancel: CancellationToken,
    transcript: Arc<crate::output::Transcript>,
}

impl FakeHost {
    /// Starts `config`'s sidecar with recording ports, as a daemon whose
    /// data directory is `data_dir` (the plugin's own is
    /// `<data_dir>/plugins/<name>/` unless `config.data_dir` says
    /// otherwise); returns once it registered (for a spawned sidecar), or
    /// with the start's error. As in a daemon, an optional plugin
    /// (`config.required` false, the default) that cannot start is no
    /// error (see `plugin().stats().failed`): a test of a sidecar that must
    /// come up sets `config.required = true`, and a sidecar that cannot
    /// start then fails `start` with the reason and its last output.
    pub async fn start(config: SidecarConfig, data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(config, data_dir, RecordingPorts::new([0x5e; 32])).await
    }

    /// Like [`FakeHost::start`], with ports prepared by the test.
    pub async fn start_with(
        config: SidecarConfig,
        data_dir: &Path,
        ports: Arc<RecordingPorts>,
    ) -> anyhow::Result<Self> {
        let plugin = Arc::new(SidecarPlugin::new(config)?);
        let transcript = plugin.transcript();
        let cancel = CancellationToken::new();
        let started = plugin
            .clone()
            .start(ports.context(data_dir, cancel.clone()))
            .await;
        let host = Self {
            plugin,
            ports,
            cancel,
            transcript,
        };
        started?;
        Ok(host)
    }

    /// The recording ports.
    pub fn ports(&self) -> &Arc<RecordingPorts> {
        &self.ports
    }

    /// The hosted plugin.
    pub fn plugin(&self) -> &Arc<SidecarPlugin> {
        &self.plugin
    }

    /// Delivers a payload the way the daemon does.
    pub async fn inject_payload(&self, src: NodeId, kind: &str, body: impl Into<Bytes>) {
        self.plugin.handle_payload(src, kind, body.into()).await;
    }

    /// Forgets a peer the way the daemon does: keystore first, then the plugin.
    pub async fn forget_peer(&self, node: NodeId) {
        self.ports.forget_peer(node);
        self.plugin.on_peer_forgotten(node).await;
    }

    /// Cancels the daemon-wide token (`PluginContext::cancel`), as a daemon
    /// does when it stops; the plugin shuts down on its own.
    pub fn cancel_daemon(&self) {
        self.cancel.cancel();
    }

    /// Ends the sidecar's Events stream with `UNAVAILABLE`, as a lost
    /// connection would: a client that keeps the protocol registers again in
    /// the same process and gets every event not acked once more. Returns
    /// whether a stream was open.
    pub fn interrupt_stream(&self) -> bool {
        self.plugin.interrupt_stream()
    }

    /// While `hold` is set, Acks are answered but do not move the ack
    /// position: after [`FakeHost::interrupt_stream`] the new stream sends
    /// events the client has handled already, which it must skip (the
    /// conformance kit's `duplicates`).
    pub fn hold_acks(&self, hold: bool) {
        self.plugin.hold_acks(hold);
    }

    /// Stops serving at once, as a daemon that dies does: no Shutdown
    /// event, the Events stream ends, the socket and token file go away. An
    /// external sidecar keeps retrying; a new `FakeHost` on the same
    /// directory is a restarted daemon (a new `host_instance`, a new token).
    pub async fn crash(&self) {
        self.plugin.crash().await;
    }

    /// Queues an event that reaches the sidecar as a kind it does not know
    /// (an `Event` whose `event` is not set, as from a newer host); a client
    /// that keeps the protocol skips and acks it. Returns its seq, `None`
    /// before `start`.
    pub fn inject_unknown_event(&self) -> Option<u64> {
        self.plugin.inject_unknown_event()
    }

    /// [`poll_until`] with the plugin's stats in the timeout error: waits
    /// on anything a test waits on that is not a port call
    /// (`plugin().stats()`, a file, a process).
    pub async fn poll_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        poll_until(what, timeout, cond)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; plugin stats: {:?}", self.plugin.stats()))
    }

    /// SIGKILLs the spawned sidecar's process (the supervisor restarts it);
    /// returns its pid, `None` when none runs.
    pub fn kill_sidecar(&self) -> Option<u32> {
        let pid = self.plugin.pid()?;
        let pid_t = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: kill has no memory-safety preconditions; `pid` is the
        // process this host's supervisor spawned and has not reaped (it
        // clears the pid when it reaps the process).
        let sent = unsafe { libc::kill(pid_t, libc::SIGKILL) } == 0;
        sent.then_some(pid)
    }

    /// Every line the sidecar's processes printed so far (stdout and
    /// stderr, restarts included), oldest first. A `FakeHost` prints them
    /// when it is dropped, which the test harness shows only for a test
    /// that failed.
    pub fn output(&self) -> Vec<String> {
        self.transcript.lines()
    }

    /// Shuts the sidecar down in order and waits for it.
    pub async fn shutdown(&self) {
        self.plugin.shutdown().await;
        self.cancel.cancel();
    }
}

impl Drop for FakeHost {
    /// A test that ends without [`FakeHost::shutdown`] (a failed assertion,
    /// say) still stops its sidecar: the daemon's token is cancelled, which
    /// stops the plugin while the runtime runs, and the process is killed
    /// at once, which needs no runtime.
    ///
    /// It prints the sidecar's output (see [`FakeHost::output`]): the test
    /// harness captures it and shows it for a failing test only.
    fn drop(&mut self) {
        self.cancel.cancel();
        // The shutdown started above runs on the test's runtime, which may
        // be dropped right after: the process is not left to outlive it.
        self.kill_sidecar();
        let lines = self.transcript.lines();
        if !lines.is_empty() {
            println!(
                "--- output of sidecar {:?} ({} lines) ---\n{}\n--- end of output of {:?} ---",
                self.plugin.name(),
                lines.len(),
                lines.join("\n"),
                self.plugin.name()
            );
        }
    }
}
