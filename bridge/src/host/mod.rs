//! The gRPC services a sidecar calls, backed by the daemon's `PluginContext`.

mod auth;
#[cfg(test)]
mod fuzz_tests;
mod ports;
mod session;

use std::sync::{Arc, Mutex};

use pim_plugin::PluginContext;
use pim_plugin_proto::pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::{Grants, SidecarConfig};
use crate::queue::EventQueue;

pub(crate) use auth::{allowed_uids, AuthCheck};
pub(crate) use session::SessionServer;

/// The state of the one live session of a plugin.
#[derive(Debug)]
struct Session {
    id: String,
    /// Cancelled when a newer Register supersedes this session.
    superseded: CancellationToken,
    /// Cancelled to end the session's Events stream as a dropped connection
    /// would ([`Host::interrupt_stream`]).
    interrupted: CancellationToken,
    events_open: bool,
    /// Whether an Events stream was ever opened for this session.
    streamed: bool,
    registered_at: std::time::Instant,
}

impl Session {
    /// Whether a client holds this session: its Events stream is open, or
    /// it registered so recently that it is about to open it.
    fn live(&self) -> bool {
        self.events_open || (!self.streamed && self.registered_at.elapsed() < LIVE_AFTER_REGISTER)
    }
}

/// How long a session without an Events stream counts as live after its
/// Register.
const LIVE_AFTER_REGISTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The trailer that tells a client its session was taken over.
pub(crate) const SESSION_END: &str = "pim-session-end";

/// The status of a call or stream of a session that a takeover ended.
pub(crate) fn superseded() -> Status {
    let mut status = Status::aborted(
        "superseded: another client took this plugin's session over (Register with takeover); this client must stop, not register again",
    );
    status.metadata_mut().insert(
        SESSION_END,
        tonic::metadata::MetadataValue::from_static("superseded"),
    );
    status
}

/// Everything the services of one plugin share.
pub(crate) struct Host {
    pub(crate) name: &'static str,
    pub(crate) kinds: &'static [&'static str],
    pub(crate) grants: Grants,
    pub(crate) config: SidecarConfig,
    pub(crate) ctx: PluginContext,
    /// The plugin's own data directory (`RegisterResponse.data_dir`).
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) queue: Arc<EventQueue>,
    session: Mutex<Option<Session>>,
    /// The ids of the sessions most recently taken over (at most 16), whose
    /// clients are told so.
    superseded_ids: Mutex<std::collections::VecDeque<String>>,
    /// Number of successful Registers so far.
    registered: watch::Sender<u64>,
    /// Cancelled when the host stops serving.
    pub(crate) stopping: CancellationToken,
    /// The spawned sidecar's process id (0: none), whose connections are
    /// never evicted from a full socket.
    pub(crate) sidecar_pid: Arc<std::sync::atomic::AtomicU32>,
    /// Set by tests of a client: Acks are answered but do not move the ack
    /// position, so a new stream sends the same events again.
    pub(crate) acks_held: std::sync::atomic::AtomicBool,
    /// Set by tests of a client: the event of this seq (0: none) is sent
    /// without its `event`, as a kind a newer host knows and the client
    /// does not.
    pub(crate) unknown_seq: std::sync::atomic::AtomicU64,
    /// Whether a clean-up of the queue is scheduled (see `forget_later`).
    pub(crate) forget_scheduled: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("kinds", &self.kinds)
            .field("grants", &self.grants)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Host {
    pub(crate) fn new(
        name: &'static str,
        kinds: &'static [&'static str],
        config: SidecarConfig,
        ctx: PluginContext,
        data_dir: std::path::PathBuf,
        queue: Arc<EventQueue>,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            name,
            kinds,
            grants: config.grants,
            config,
            ctx,
            data_dir,
            queue,
            session: Mutex::new(None),
            superseded_ids: Mutex::default(),
            registered: watch::channel(0).0,
            stopping,
            sidecar_pid: Arc::default(),
            acks_held: std::sync::atomic::AtomicBool::new(false),
            unknown_seq: std::sync::atomic::AtomicU64::new(0),
            forget_scheduled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Ends the live session's Events stream with `UNAVAILABLE`, as a lost
    /// connection would: the client registers again and gets the events it
    /// has not acked once more. Returns whether a stream was open.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn interrupt_stream(&self) -> bool {
        match &*self.sessions() {
            Some(s) if s.events_open => {
                s.interrupted.cancel();
                true
            }
            _ => false,
        }
    }

    /// Whether `id` belongs to a session that a takeover ended.
    fn was_superseded(&self, id: &str) -> bool {
        self.superseded_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == id)
    }

    /// Remembers that a takeover ended session `id`.
    fn note_superseded(&self, id: String) {
        let mut ids = self
            .superseded_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if ids.len() == 16 {
            ids.pop_front();
        }
        ids.push_back(id);
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `id` names the live session.
    pub(crate) fn check_session(&self, id: &str) -> Result<(), Status> {
        pim_plugin_proto::convert::bounded_text(
            "session_id",
            id,
            pim_plugin_proto::limits::MAX_SESSION_ID_BYTES,
        )?;
        match &*self.sessions() {
            None => Err(Status::failed_precondition(
                "no session: call PluginSession/Register first",
            )),
            Some(s) if s.id == id => Ok(()),
            Some(_) if id.is_empty() => Err(Status::invalid_argument(
                "invalid field `session_id`: is required (from RegisterResponse)",
            )),
            Some(_) if self.was_superseded(id) => Err(superseded()),
            Some(_) => Err(Status::failed_precondition(
                "stale session: this session id is not the live one (it ended when a later Register replaced it after its client went away, or it was never issued); register again",
            )),
        }
    }

    /// Subscribes to the count of successful Registers.
    pub(crate) fn registrations(&self) -> watch::Receiver<u64> {
        self.registered.subscribe()
    }

    /// Whether a sidecar has registered and holds an Events stream open.
    pub(crate) fn connected(&self) -> bool {
        self.sessions().as_ref().is_some_and(|s| s.events_open)
    }

    pub(crate) fn granted(&self) -> Vec<i32> {
        let mut granted = Vec::new();
        if self.grants.signing_seed {
            granted.push(pb::Capability::SigningSeed as i32);
        }
        if self.grants.raw_control {
            granted.push(pb::Capability::RawControl as i32);
        }
        granted
    }
}

/// The tonic service implementations: one value serves all four services.
#[derive(Debug, Clone)]
pub(crate) struct HostServices(pub(crate) Arc<Host>);
