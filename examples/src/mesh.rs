//! A simulated mesh in one process: nodes with their own `PeerDirectory`,
//! `ControlSender` and `IdentitySecrets`, frames routed between nodes in
//! memory, and `PluginPayload` frames dispatched to each node's plugins the
//! way `pim-daemon` does (the first plugin claiming the kind; its
//! `handle_payload` awaited inline).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};

use async_trait::async_trait;
use pim_core::NodeId;
use pim_plugin::{
    ControlSender, DaemonPlugin, IdentitySecrets, PeerDirectory, PeerDirectoryEvent,
    PeerInfoSource, PluginContext,
};
use pim_protocol::ControlFrame;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Something that happened on the mesh, for printing and for waiting on.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// A frame crossed from one node to another.
    Frame {
        /// Sending node's name.
        from: String,
        /// Receiving node's name.
        to: String,
        /// The frame.
        frame: ControlFrame,
        /// The plugin it was dispatched to, if any claimed it.
        plugin: Option<&'static str>,
    },
    /// A node's port was called by a plugin.
    PortCall {
        /// The node's name.
        node: String,
        /// What was called, and the answer.
        call: String,
    },
}

/// One simulated node.
pub struct Node {
    /// Node id.
    pub id: NodeId,
    /// Friendly name.
    pub name: String,
    seed: [u8; 32],
    x25519: [u8; 32],
    data_dir: PathBuf,
    known: RwLock<HashMap<NodeId, (String, [u8; 32])>>,
    directory_events: broadcast::Sender<PeerDirectoryEvent>,
    plugins: RwLock<Vec<Arc<dyn DaemonPlugin>>>,
    mesh: Weak<MeshInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct MeshInner {
    nodes: RwLock<Vec<Arc<Node>>>,
    events: mpsc::UnboundedSender<MeshEvent>,
}

/// The simulated mesh.
pub struct Mesh {
    inner: Arc<MeshInner>,
    cancel: CancellationToken,
    events: Mutex<Option<mpsc::UnboundedReceiver<MeshEvent>>>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new()
    }
}

impl Mesh {
    /// An empty mesh.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(MeshInner {
                nodes: RwLock::new(Vec::new()),
                events: tx,
            }),
            cancel: CancellationToken::new(),
            events: Mutex::new(Some(rx)),
        }
    }

    /// Takes the stream of mesh events (once).
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<MeshEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Adds a node named `name` whose seed is `seed`; every node learns every
    /// other (a fully connected mesh of direct neighbours).
    pub fn add_node(&self, name: &str, seed: [u8; 32], data_dir: PathBuf) -> Arc<Node> {
        // The X25519 key is the real one derived from the seed (what ECIES
        // decryption with the seed expects); the node id is derived from it.
        let x25519 = pim_crypto::x25519_public_from_seed(&seed);
        let node = Arc::new(Node {
            id: NodeId::from_public_key(&x25519),
            name: name.to_owned(),
            seed,
            x25519,
            data_dir,
            known: RwLock::new(HashMap::new()),
            directory_events: broadcast::channel(256).0,
            plugins: RwLock::new(Vec::new()),
            mesh: Arc::downgrade(&self.inner),
        });
        let mut nodes = self.inner.nodes.write().unwrap_or_else(|e| e.into_inner());
        for other in nodes.iter() {
            other.learn(&node);
            node.learn(other);
        }
        nodes.push(node.clone());
        node
    }

    /// Starts `plugin` on `node`, like the daemon at boot.
    pub async fn start_plugin(
        &self,
        node: &Arc<Node>,
        plugin: Arc<dyn DaemonPlugin>,
    ) -> anyhow::Result<()> {
        plugin
            .clone()
            .start(node.context(self.cancel.clone()))
            .await?;
        node.plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(plugin);
        Ok(())
    }

    /// Shuts down every plugin of every node, like the daemon at teardown.
    pub async fn shutdown(&self) {
        let nodes = self
            .inner
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for node in nodes {
            let plugins = node
                .plugins
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for plugin in plugins {
                plugin.shutdown().await;
            }
        }
        self.cancel.cancel();
    }
}

impl Node {
    fn learn(&self, other: &Node) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(other.id, (other.name.clone(), other.x25519));
        let _ = self.directory_events.send(PeerDirectoryEvent::Seen {
            node_id: other.id,
            x25519_pub: other.x25519,
            name: other.name.clone(),
            via: PeerInfoSource::Direct,
        });
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Forgets `peer`, then tells every plugin, like `peers.forget`.
    pub async fn forget(&self, peer: NodeId) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        let _ = self
            .directory_events
            .send(PeerDirectoryEvent::Forgotten { node_id: peer });
        let plugins = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for plugin in plugins {
            plugin.on_peer_forgotten(peer).await;
        }
    }

    /// Sends `frame` from this node to `dst` through the mesh.
    pub async fn send(&self, dst: NodeId, frame: ControlFrame) -> bool {
        let Some(mesh) = self.mesh.upgrade() else {
            return false;
        };
        let target = mesh
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|n| n.id == dst)
            .cloned();
        let Some(target) = target else {
            return false;
        };
        target.receive(self, frame, &mesh).await;
        true
    }

    /// An inbound frame: `PluginPayload` goes to the first plugin claiming
    /// its kind, awaited inline as pim-daemon's event loop does.
    async fn receive(&self, from: &Node, frame: ControlFrame, mesh: &MeshInner) {
        let mut claimed = None;
        if let ControlFrame::PluginPayload { kind, body } = &frame {
            let plugin = self
                .plugins
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|p| p.payload_kinds().contains(&kind.as_str()))
                .cloned();
            if let Some(plugin) = plugin {
                claimed = Some(plugin.name());
                plugin.handle_payload(from.id, kind, body.clone()).await;
            }
        }
        let _ = mesh.events.send(MeshEvent::Frame {
            from: from.name.clone(),
            to: self.name.clone(),
            frame,
            plugin: claimed,
        });
    }

    fn context(self: &Arc<Self>, cancel: CancellationToken) -> PluginContext {
        let ports = Arc::new(NodePorts(self.clone()));
        PluginContext {
            peers: ports.clone(),
            control: ports.clone(),
            identity: ports,
            data_dir: self.data_dir.clone(),
            cancel,
        }
    }

    fn report(&self, call: String) {
        if let Some(mesh) = self.mesh.upgrade() {
            let _ = mesh.events.send(MeshEvent::PortCall {
                node: self.name.clone(),
                call,
            });
        }
    }

    fn name_of(&self, node: &NodeId) -> String {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .map_or_else(|| node.to_string(), |(n, _)| n.clone())
    }
}

/// The ports one node hands its plugins.
struct NodePorts(Arc<Node>);

#[async_trait]
impl PeerDirectory for NodePorts {
    async fn lookup_x25519(&self, peer: &NodeId) -> Option<[u8; 32]> {
        let key = self
            .0
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map(|(_, k)| *k);
        self.0.report(format!(
            "LookupX25519({}) -> {}",
            self.0.name_of(peer),
            if key.is_some() { "key" } else { "unknown" }
        ));
        key
    }

    async fn lookup_name(&self, peer: &NodeId) -> Option<String> {
        let name = self
            .0
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map(|(n, _)| n.clone());
        self.0
            .report(format!("LookupName({}) -> {name:?}", self.0.name_of(peer)));
        name
    }

    fn subscribe(&self) -> broadcast::Receiver<PeerDirectoryEvent> {
        self.0.directory_events.subscribe()
    }
}

#[async_trait]
impl ControlSender for NodePorts {
    async fn send_direct(&self, peer: NodeId, frame: ControlFrame) {
        self.0
            .report(format!("SendDirect(to {})", self.0.name_of(&peer)));
        self.0.send(peer, frame).await;
    }

    async fn send_routed(&self, dst: NodeId, frame: ControlFrame) -> bool {
        let to = self.0.name_of(&dst);
        let routable = self.0.mesh.upgrade().is_some_and(|m| {
            m.nodes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|n| n.id == dst)
        });
        if !routable {
            self.0.report(format!("SendRouted(to {to}) -> no route"));
            return false;
        }
        let node = self.0.clone();
        // Routed delivery is asynchronous in the daemon: the frame goes out on
        // the transport and this call returns.
        tokio::spawn(async move { node.send(dst, frame).await });
        self.0.report(format!("SendRouted(to {to}) -> attempted"));
        true
    }
}

impl IdentitySecrets for NodePorts {
    fn signing_seed(&self) -> [u8; 32] {
        self.0.report("SigningSeed".to_owned());
        self.0.seed
    }
}
