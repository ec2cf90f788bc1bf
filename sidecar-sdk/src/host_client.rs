//! `HostClient`: the daemon's ports, called over gRPC in domain types.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin_proto::batch::EventBatch;
use pim_plugin_proto::codec::{EventBatchCodec, EVENTS_PATH};
use pim_plugin_proto::convert::{self, WatchEvent};
use pim_plugin_proto::limits::MAX_MESSAGE_BYTES;
use pim_plugin_proto::pb::control_sender_client::ControlSenderClient;
use pim_plugin_proto::pb::identity_secrets_client::IdentitySecretsClient;
use pim_plugin_proto::pb::peer_directory_client::PeerDirectoryClient;
use pim_plugin_proto::pb::plugin_session_client::PluginSessionClient;
use pim_plugin_proto::{auth, pb};
use pim_protocol::ControlFrame;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::connect::{checked_token, connect_channel};
use crate::HostError;

/// The daemon's ports, as a plugin's handlers call them: peer lookups, the
/// keystore watch, sends, and the signing seed.
///
/// A plugin gets one in [`Context::host`](crate::Context::host); the
/// session machinery (Register, the Events stream, Ack) stays with
/// [`crate::run`], in [`HostSession`], so a handler cannot disturb its own
/// session. Cheap to clone; every clone shares one connection and follows
/// the session across reconnects.
#[derive(Clone)]
pub struct HostClient {
    channel: Channel,
    auth: Arc<RwLock<MetadataValue<Ascii>>>,
    session: Arc<RwLock<Arc<str>>>,
    busy_poll: Duration,
    /// Whether port calls poll now, shared by the clones.
    gate: Arc<crate::poll::PollGate>,
}

impl std::fmt::Debug for HostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostClient")
            .field("session_id", &self.session_id())
            .field("busy_poll", &self.busy_poll)
            .finish_non_exhaustive()
    }
}

impl HostClient {
    /// Sets how long each port call (lookups, sends, the signing seed)
    /// polls for its answer before letting the runtime sleep.
    ///
    /// A host answers a port call in tens of microseconds. Sleeping until
    /// then costs a context switch and, on a virtual machine, waking an idle
    /// CPU, which is as much again; polling keeps this process's thread
    /// running instead, at the price of that CPU time. Other tasks of the
    /// runtime keep running while a call polls. When this thread and the
    /// host's answering thread run on one CPU, polling would only hand that
    /// CPU back and forth: a call now and then measures whether it gave its
    /// CPU to other threads while it polled, and if so the next 63 calls
    /// wait without polling (then one measures again); every clone of a
    /// client shares that measurement. `Duration::ZERO` turns polling off.
    /// The budget applies to this client and the clones made from it
    /// afterwards.
    #[must_use]
    pub fn with_busy_poll(mut self, budget: Duration) -> Self {
        self.busy_poll = budget;
        self
    }

    /// The busy-poll budget of each port call.
    pub fn busy_poll(&self) -> Duration {
        self.busy_poll
    }

    /// The live session id ("" before Register), as the host logs it.
    pub fn session_id(&self) -> Arc<str> {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Awaits a port call, busy-polling for up to the budget first unless
    /// the CPU was found shared with the host's thread (`PollGate`).
    ///
    /// The call's future (kilobytes of tonic state) and the poll's go in a
    /// box, so that the future of a handler that calls a port stays small:
    /// the SDK boxes a handler's future for every event it delivers, and
    /// copies it there.
    fn port_call<T: Send>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>> + Send + 'static,
    ) -> impl Future<Output = Result<T, HostError>> + Send {
        let budget = self.busy_poll;
        let gate = self.gate.clone();
        let call = Box::pin(async move { gate.call(call, budget).await });
        async move { Ok(call.await?.into_inner()) }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let value = self.auth.read().unwrap_or_else(|e| e.into_inner()).clone();
        req.metadata_mut().insert(auth::METADATA_KEY, value);
        req
    }

    /// The X25519 public key of `node`, `None` when the peer is unknown.
    pub async fn lookup_x25519(&self, node: &NodeId) -> Result<Option<[u8; 32]>, HostError> {
        let req = self.req(pb::LookupX25519Request {
            session_id: self.session_id().to_string(),
            node: Bytes::copy_from_slice(node.as_bytes()),
        });
        let mut client = PeerDirectoryClient::new(self.channel.clone());
        let resp = self
            .port_call(async move { client.lookup_x25519(req).await })
            .await?;
        Ok(resp
            .x25519
            .map(|k| convert::key("x25519", &k))
            .transpose()?)
    }

    /// The friendly name of `node`, `None` when the peer is unknown.
    pub async fn lookup_name(&self, node: &NodeId) -> Result<Option<String>, HostError> {
        let req = self.req(pb::LookupNameRequest {
            session_id: self.session_id().to_string(),
            node: Bytes::copy_from_slice(node.as_bytes()),
        });
        let mut client = PeerDirectoryClient::new(self.channel.clone());
        let resp = self
            .port_call(async move { client.lookup_name(req).await })
            .await?;
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
        let req = self.req(pb::SendDirectRequest {
            session_id: self.session_id().to_string(),
            peer: Bytes::copy_from_slice(peer.as_bytes()),
            frame: Some(frame.into()),
        });
        let mut client = ControlSenderClient::new(self.channel.clone());
        self.port_call(async move { client.send_direct(req).await })
            .await?;
        Ok(())
    }

    /// Sends `frame` through the routing table; `false` when there is no route.
    pub async fn send_routed(&self, dst: NodeId, frame: ControlFrame) -> Result<bool, HostError> {
        let req = self.req(pb::SendRoutedRequest {
            session_id: self.session_id().to_string(),
            dst: Bytes::copy_from_slice(dst.as_bytes()),
            frame: Some(frame.into()),
        });
        let mut client = ControlSenderClient::new(self.channel.clone());
        let resp = self
            .port_call(async move { client.send_routed(req).await })
            .await?;
        Ok(resp.attempted)
    }

    /// The node's Ed25519 signing seed; needs the SIGNING_SEED capability.
    ///
    /// The response buffer is wiped when this client holds the only
    /// reference to it; wipe the returned copy when done (for example with
    /// `zeroize::Zeroizing`).
    pub async fn signing_seed(&self) -> Result<[u8; 32], HostError> {
        let req = self.req(pb::SigningSeedRequest {
            session_id: self.session_id().to_string(),
        });
        let mut client = IdentitySecretsClient::new(self.channel.clone());
        let resp = self
            .port_call(async move { client.signing_seed(req).await })
            .await?;
        let seed = convert::key("seed", &resp.seed);
        if let Ok(mut buf) = resp.seed.try_into_mut() {
            zeroize::Zeroize::zeroize(&mut buf[..]);
        }
        Ok(seed?)
    }
}

/// The session machinery of one plugin's connection: Register, the Events
/// stream and Ack, which [`crate::run`] drives.
///
/// A plugin written with [`crate::run`] never needs it. It is public for a
/// client that drives the protocol itself, such as a test of the host; its
/// [`HostSession::ports`] are the [`HostClient`] a handler gets.
#[derive(Debug, Clone)]
pub struct HostSession {
    ports: HostClient,
}

impl HostSession {
    /// Connects to the socket at `path`, presenting `token` on every call,
    /// with the [default busy poll](crate::default_busy_poll).
    /// Call [`HostSession::register`] before anything else.
    pub async fn connect(path: &Path, token: &str) -> Result<Self, HostError> {
        let bearer = Self::bearer(token)?;
        let channel = connect_channel(path).await.map_err(HostError::Connect)?;
        Ok(Self::with_bearer(channel, bearer))
    }

    /// A session over an existing channel; an error when `token` is empty
    /// or not printable ASCII (the host only hands out hex tokens).
    pub fn with_channel(channel: Channel, token: &str) -> Result<Self, HostError> {
        Ok(Self::with_bearer(channel, Self::bearer(token)?))
    }

    fn with_bearer(channel: Channel, bearer: MetadataValue<Ascii>) -> Self {
        Self {
            ports: HostClient {
                channel,
                auth: Arc::new(RwLock::new(bearer)),
                session: Arc::new(RwLock::new(Arc::from(""))),
                busy_poll: crate::default_busy_poll(),
                gate: Arc::default(),
            },
        }
    }

    fn bearer(token: &str) -> Result<MetadataValue<Ascii>, HostError> {
        let token = checked_token(token, "the token")
            .map_err(|e| HostError::InvalidToken(e.to_string()))?;
        auth::bearer(&token)
            .parse()
            .map_err(|_| HostError::InvalidToken("the token is not printable ASCII".into()))
    }

    /// Sets the busy-poll budget of the port calls; see
    /// [`HostClient::with_busy_poll`].
    #[must_use]
    pub fn with_busy_poll(mut self, budget: Duration) -> Self {
        self.ports.busy_poll = budget;
        self
    }

    /// The ports of this session, for a plugin's handlers.
    pub fn ports(&self) -> HostClient {
        self.ports.clone()
    }

    /// Replaces the token (after the host restarted with a new one); an
    /// error, and the old token kept, when it is not a valid token.
    pub fn set_token(&self, token: &str) -> Result<(), HostError> {
        let bearer = Self::bearer(token)?;
        *self.ports.auth.write().unwrap_or_else(|e| e.into_inner()) = bearer;
        Ok(())
    }

    /// The live session id ("" before Register).
    pub fn session_id(&self) -> Arc<str> {
        self.ports.session_id()
    }

    fn client(&self) -> PluginSessionClient<Channel> {
        PluginSessionClient::new(self.ports.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Opens a session: the host checks the name, kinds and protocol
    /// version. With `takeover`, a live session of another client is taken
    /// over (it ends with `ABORTED`) instead of refused with `ALREADY_EXISTS`.
    pub async fn register(
        &self,
        name: &str,
        kinds: &[&str],
        sdk_name: &str,
        takeover: bool,
    ) -> Result<pb::RegisterResponse, HostError> {
        let resp = self
            .client()
            .register(self.ports.req(pb::RegisterRequest {
                protocol_version: pim_plugin_proto::PROTOCOL_VERSION,
                plugin_name: name.to_owned(),
                payload_kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
                sdk_name: sdk_name.to_owned(),
                sdk_version: env!("CARGO_PKG_VERSION").to_owned(),
                takeover,
            }))
            .await?
            .into_inner();
        *self
            .ports
            .session
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::from(resp.session_id.as_str());
        Ok(resp)
    }

    /// Opens the Events stream of the live session.
    pub async fn events(&self) -> Result<Streaming<pb::EventsResponse>, HostError> {
        let session_id = self.session_id().to_string();
        Ok(self
            .client()
            .events(self.ports.req(pb::EventsRequest { session_id }))
            .await?
            .into_inner())
    }

    /// Opens the Events stream of the live session, each message kept as
    /// it came off the wire: an [`EventBatch`] reads its events one at a
    /// time (a payload's kind borrowed from the batch, its body a slice of
    /// it), so the first event can be handled before the rest are read.
    /// [`run`](crate::run) delivers from this stream.
    pub async fn event_batches(&self) -> Result<Streaming<EventBatch>, HostError> {
        let session_id = self.session_id().to_string();
        let mut grpc = tonic::client::Grpc::new(self.ports.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("the host's channel is not ready: {e}")))?;
        let mut req = self.ports.req(pb::EventsRequest { session_id });
        req.extensions_mut().insert(tonic::GrpcMethod::new(
            pb::plugin_session_server::SERVICE_NAME,
            "Events",
        ));
        let path = PathAndQuery::from_static(EVENTS_PATH);
        Ok(grpc
            .server_streaming(req, path, EventBatchCodec)
            .await?
            .into_inner())
    }

    /// Acknowledges every event up to `seq`; returns the host's acked position.
    pub async fn ack(&self, seq: u64) -> Result<u64, HostError> {
        let session_id = self.session_id().to_string();
        Ok(self
            .client()
            .ack(self.ports.req(pb::AckRequest { session_id, seq }))
            .await?
            .into_inner()
            .acked_seq)
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use pim_core::NodeId;
    use pim_protocol::ControlFrame;
    use tonic::transport::Endpoint;

    use crate::HostSession;

    /// The SDK boxes a handler's future for every event and copies it there:
    /// a handler that calls a port must not carry the call's tonic state.
    #[tokio::test(flavor = "current_thread")]
    async fn port_call_futures_stay_small() {
        let channel = Endpoint::from_static("http://localhost").connect_lazy();
        let host = HostSession::with_channel(channel, "00").unwrap().ports();
        let node = NodeId::from_bytes([1; 16]);
        let frame = ControlFrame::PluginPayload {
            kind: "t.k".into(),
            body: Bytes::new(),
        };
        let sizes = [
            (
                "lookup_x25519",
                std::mem::size_of_val(&host.lookup_x25519(&node)),
            ),
            (
                "lookup_name",
                std::mem::size_of_val(&host.lookup_name(&node)),
            ),
            (
                "send_direct",
                std::mem::size_of_val(&host.send_direct(node, frame.clone())),
            ),
            (
                "send_routed",
                std::mem::size_of_val(&host.send_routed(node, frame)),
            ),
            ("signing_seed", std::mem::size_of_val(&host.signing_seed())),
        ];
        for (call, size) in sizes {
            assert!(size <= 512, "the future of {call} is {size} bytes");
        }
    }
}
