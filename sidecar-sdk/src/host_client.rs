//! `HostClient`: the daemon's ports, called over gRPC in domain types.

use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin_proto::convert::{self, WatchEvent};
use pim_plugin_proto::limits::MAX_MESSAGE_BYTES;
use pim_plugin_proto::pb::control_sender_client::ControlSenderClient;
use pim_plugin_proto::pb::identity_secrets_client::IdentitySecretsClient;
use pim_plugin_proto::pb::peer_directory_client::PeerDirectoryClient;
use pim_plugin_proto::pb::plugin_session_client::PluginSessionClient;
use pim_plugin_proto::{auth, pb};
use pim_protocol::ControlFrame;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Streaming};

use crate::connect::connect_channel;
use crate::HostError;

/// A typed client of the daemon's ports.
///
/// Cheap to clone; every clone shares one connection and follows the
/// session across reconnects.
#[derive(Clone)]
pub struct HostClient {
    channel: Channel,
    auth: Arc<RwLock<MetadataValue<Ascii>>>,
    session: Arc<RwLock<Arc<str>>>,
}

impl std::fmt::Debug for HostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostClient")
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

impl HostClient {
    /// Connects to the socket at `path`, presenting `token` on every call.
    /// Call [`HostClient::register`] before anything else.
    pub async fn connect(path: &Path, token: &str) -> Result<Self, HostError> {
        let channel = connect_channel(path).await.map_err(HostError::Connect)?;
        Ok(Self::with_channel(channel, token))
    }

    /// A client over an existing channel.
    ///
    /// # Panics
    ///
    /// If `token` is not printable ASCII (the host only hands out hex tokens).
    pub fn with_channel(channel: Channel, token: &str) -> Self {
        Self {
            channel,
            auth: Arc::new(RwLock::new(Self::bearer(token))),
            session: Arc::new(RwLock::new(Arc::from(""))),
        }
    }

    fn bearer(token: &str) -> MetadataValue<Ascii> {
        auth::bearer(token)
            .parse()
            .expect("plugin tokens are printable ASCII")
    }

    /// Replaces the token (after the host restarted with a new one).
    ///
    /// # Panics
    ///
    /// If `token` is not printable ASCII.
    pub fn set_token(&self, token: &str) {
        *self.auth.write().unwrap_or_else(|e| e.into_inner()) = Self::bearer(token);
    }

    /// The live session id ("" before Register).
    pub fn session_id(&self) -> Arc<str> {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let value = self.auth.read().unwrap_or_else(|e| e.into_inner()).clone();
        req.metadata_mut().insert(auth::METADATA_KEY, value);
        req
    }

    fn session_client(&self) -> PluginSessionClient<Channel> {
        PluginSessionClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Opens a session: the host checks the name, kinds and protocol version.
    pub async fn register(
        &self,
        name: &str,
        kinds: &[&str],
        sdk_name: &str,
    ) -> Result<pb::RegisterResponse, HostError> {
        let resp = self
            .session_client()
            .register(self.req(pb::RegisterRequest {
                protocol_version: pim_plugin_proto::PROTOCOL_VERSION,
                plugin_name: name.to_owned(),
                payload_kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
                sdk_name: sdk_name.to_owned(),
                sdk_version: env!("CARGO_PKG_VERSION").to_owned(),
            }))
            .await?
            .into_inner();
        *self.session.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::from(resp.session_id.as_str());
        Ok(resp)
    }

    /// Opens the Events stream of the live session.
    pub async fn events(&self) -> Result<Streaming<pb::EventsResponse>, HostError> {
        let session_id = self.session_id().to_string();
        Ok(self
            .session_client()
            .events(self.req(pb::EventsRequest { session_id }))
            .await?
            .into_inner())
    }

    /// Acknowledges every event up to `seq`; returns the host's acked position.
    pub async fn ack(&self, seq: u64) -> Result<u64, HostError> {
        let session_id = self.session_id().to_string();
        Ok(self
            .session_client()
            .ack(self.req(pb::AckRequest { session_id, seq }))
            .await?
            .into_inner()
            .acked_seq)
    }

    /// The X25519 public key of `node`, `None` when the peer is unknown.
    pub async fn lookup_x25519(&self, node: &NodeId) -> Result<Option<[u8; 32]>, HostError> {
        let resp = PeerDirectoryClient::new(self.channel.clone())
            .lookup_x25519(self.req(pb::LookupX25519Request {
                session_id: self.session_id().to_string(),
                node: Bytes::copy_from_slice(node.as_bytes()),
            }))
            .await?
            .into_inner();
        Ok(resp
            .x25519
            .map(|k| convert::key("x25519", &k))
            .transpose()?)
    }

    /// The friendly name of `node`, `None` when the peer is unknown.
    pub async fn lookup_name(&self, node: &NodeId) -> Result<Option<String>, HostError> {
        let resp = PeerDirectoryClient::new(self.channel.clone())
            .lookup_name(self.req(pb::LookupNameRequest {
                session_id: self.session_id().to_string(),
                node: Bytes::copy_from_slice(node.as_bytes()),
            }))
            .await?
            .into_inner();
        if let Some(name) = &resp.name {
            convert::friendly_name("name", name)?;
        }
        Ok(resp.name)
    }

    /// Watches keystore changes from now on.
    pub async fn watch(&self) -> Result<PeerWatch, HostError> {
        let stream = PeerDirectoryClient::new(self.channel.clone())
            .watch(self.req(pb::WatchRequest {
                session_id: self.session_id().to_string(),
            }))
            .await?
            .into_inner();
        Ok(PeerWatch { stream })
    }

    /// Sends `frame` to a directly connected peer (best effort).
    pub async fn send_direct(&self, peer: NodeId, frame: ControlFrame) -> Result<(), HostError> {
        ControlSenderClient::new(self.channel.clone())
            .send_direct(self.req(pb::SendDirectRequest {
                session_id: self.session_id().to_string(),
                peer: Bytes::copy_from_slice(peer.as_bytes()),
                frame: Some(frame.into()),
            }))
            .await?;
        Ok(())
    }

    /// Sends `frame` through the routing table; `false` when there is no route.
    pub async fn send_routed(&self, dst: NodeId, frame: ControlFrame) -> Result<bool, HostError> {
        Ok(ControlSenderClient::new(self.channel.clone())
            .send_routed(self.req(pb::SendRoutedRequest {
                session_id: self.session_id().to_string(),
                dst: Bytes::copy_from_slice(dst.as_bytes()),
                frame: Some(frame.into()),
            }))
            .await?
            .into_inner()
            .attempted)
    }

    /// The node's Ed25519 signing seed; needs the SIGNING_SEED capability.
    ///
    /// The response buffer is wiped when this client holds the only
    /// reference to it; wipe the returned copy when done (for example with
    /// `zeroize::Zeroizing`).
    pub async fn signing_seed(&self) -> Result<[u8; 32], HostError> {
        let resp = IdentitySecretsClient::new(self.channel.clone())
            .signing_seed(self.req(pb::SigningSeedRequest {
                session_id: self.session_id().to_string(),
            }))
            .await?
            .into_inner();
        let seed = convert::key("seed", &resp.seed);
        if let Ok(mut buf) = resp.seed.try_into_mut() {
            zeroize::Zeroize::zeroize(&mut buf[..]);
        }
        Ok(seed?)
    }
}

/// A stream of keystore changes from [`HostClient::watch`].
#[derive(Debug)]
pub struct PeerWatch {
    stream: Streaming<pb::WatchResponse>,
}

impl PeerWatch {
    /// The next change; `Ok(None)` when the host ended the stream.
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, HostError> {
        match self.stream.message().await? {
            Some(msg) => Ok(Some(WatchEvent::try_from(msg)?)),
            None => Ok(None),
        }
    }
}
