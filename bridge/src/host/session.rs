//! `PluginSession`: Register, the Events stream and Ack.

use std::collections::BTreeSet;
use std::pin::Pin;

use std::convert::Infallible;

use pim_plugin_proto::batch::OutgoingBatch;
use pim_plugin_proto::codec::{EventsServerCodec, EVENTS_PATH};
use pim_plugin_proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_MESSAGE_BYTES};
use pim_plugin_proto::pb::plugin_session_server::{PluginSession, PluginSessionServer};
use pim_plugin_proto::{convert, limits, pb, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{http, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::{HostServices, Session};

/// A fresh, unguessable session id.
fn new_session_id() -> String {
    crate::secret::random_hex(16)
}

#[tonic::async_trait]
impl PluginSession for HostServices {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let host = &self.0;
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: the sidecar speaks {}, this host speaks {PROTOCOL_VERSION}",
                req.protocol_version
            )));
        }
        convert::plugin_name("plugin_name", &req.plugin_name)?;
        convert::payload_kinds("payload_kinds", &req.payload_kinds)?;
        convert::bounded_text("sdk_name", &req.sdk_name, limits::MAX_SDK_FIELD_BYTES)?;
        convert::bounded_text("sdk_version", &req.sdk_version, limits::MAX_SDK_FIELD_BYTES)?;
        if req.plugin_name != host.name {
            return Err(Status::failed_precondition(format!(
                "plugin name mismatch: the sidecar registered as `{}`, this socket is configured for `{}`",
                req.plugin_name, host.name
            )));
        }
        let offered: BTreeSet<&str> = req.payload_kinds.iter().map(String::as_str).collect();
        let configured: BTreeSet<&str> = host.kinds.iter().copied().collect();
        if offered != configured {
            let missing = convert::excerpt(configured.difference(&offered).copied(), 8);
            let extra = convert::excerpt(offered.difference(&configured).copied(), 8);
            return Err(Status::failed_precondition(format!(
                "payload kinds mismatch for plugin `{}`: configured but not registered {missing}; registered but not configured {extra}",
                host.name
            )));
        }
        let id = new_session_id();
        let took_over = {
            let mut slot = host.sessions();
            let live = slot.as_ref().is_some_and(Session::live);
            if live && !req.takeover {
                return Err(Status::already_exists(format!(
                    "plugin `{}` already has a live client (it holds the Events stream, or registered less than 10 s ago); a second one is refused. Wait for it to end, or register with `takeover: true` (the SDKs: PIM_PLUGIN_TAKEOVER=1) to replace it",
                    host.name
                )));
            }
            if let Some(old) = slot.take() {
                if live {
                    host.note_superseded(old.id.clone());
                }
                old.superseded.cancel();
                host.queue.wake();
            }
            *slot = Some(Session {
                id: id.clone(),
                superseded: CancellationToken::new(),
                interrupted: CancellationToken::new(),
                events_open: false,
                streamed: false,
                registered_at: std::time::Instant::now(),
            });
            live
        };
        if took_over {
            tracing::warn!(plugin = host.name, "a client took the live session over (Register with takeover); the previous client is told to stop");
        }
        tracing::info!(
            plugin = host.name,
            // Escaped: a sidecar's text cannot forge a log line.
            sdk = ?req.sdk_name,
            sdk_version = ?req.sdk_version,
            "sidecar registered"
        );
        host.registered.send_modify(|n| *n += 1);
        let queue = host.config.queue;
        Ok(Response::new(pb::RegisterResponse {
            session_id: id,
            protocol_version: PROTOCOL_VERSION,
            data_dir: host.data_dir.to_string_lossy().into_owned(),
            granted: host.granted(),
            limits: Some(pb::Limits {
                max_body_bytes: limits::MAX_BODY_BYTES as u32,
                max_kind_bytes: limits::MAX_KIND_BYTES as u32,
                max_name_bytes: limits::MAX_NAME_BYTES as u32,
                max_message_bytes: MAX_MESSAGE_BYTES as u32,
                max_queued_events: u32::try_from(queue.max_events).unwrap_or(u32::MAX),
                max_queued_bytes: queue.max_bytes as u64,
            }),
            acked_seq: host.queue.acked(),
            host_instance: host.queue.instance().to_owned(),
        }))
    }

    type EventsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::EventsResponse, Status>> + Send>>;

    /// The trait's Events: the stream [`SessionServer`] serves, as prost's
    /// messages. The host's server never calls it ([`SessionServer`] sends
    /// the Events call to [`EventsServerCodec`]); the session fuzz test does.
    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        use tokio_stream::StreamExt as _;
        let batches = self.event_batches(req)?;
        Ok(Response::new(Box::pin(
            batches.map(|batch| batch.map(|b| b.to_message())),
        )))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let last = self.0.queue.last_seq();
        if req.seq > last {
            return Err(Status::invalid_argument(format!(
                "invalid field `seq`: {} is past the newest event, {last}",
                req.seq
            )));
        }
        if self.0.acks_held.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Response::new(pb::AckResponse {
                acked_seq: self.0.queue.acked(),
            }));
        }
        let acked_seq = self.0.queue.ack(req.seq);
        if acked_seq == self.0.queue.last_seq() {
            forget_later(&self.0);
        }
        Ok(Response::new(pb::AckResponse { acked_seq }))
    }
}

/// The largest request either route of [`SessionServer`] decodes (no
/// compression on either, no limit on what it sends).
const REQUEST_LIMIT: usize = MAX_MESSAGE_BYTES;

/// An Events stream's batches.
type EventBatches = ReceiverStream<Result<OutgoingBatch, Status>>;

/// The `PluginSession` service as the host serves it: the generated
/// server, except for Events, which goes out through
/// [`EventsServerCodec`]: each batch written straight from the queue's
/// events, with no wire message built for it (a `String` for each kind, a
/// `Vec` for each batch). Both routes take their request limit from
/// [`REQUEST_LIMIT`], so that they cannot differ.
#[derive(Debug, Clone)]
pub(crate) struct SessionServer {
    generated: PluginSessionServer<HostServices>,
    services: HostServices,
}

impl SessionServer {
    pub(crate) fn new(services: HostServices) -> Self {
        Self {
            generated: PluginSessionServer::new(services.clone())
                .max_decoding_message_size(REQUEST_LIMIT),
            services,
        }
    }
}

impl NamedService for SessionServer {
    const NAME: &'static str = pb::plugin_session_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for SessionServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EVENTS_PATH {
            return self.generated.call(req);
        }
        let call = EventsCall(self.services.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(EventsServerCodec)
                .apply_max_message_size_config(Some(REQUEST_LIMIT), None);
            Ok(grpc.server_streaming(call, req).await)
        })
    }
}

/// The Events call, as [`SessionServer`] serves it.
struct EventsCall(HostServices);

impl tonic::server::ServerStreamingService<pb::EventsRequest> for EventsCall {
    type Response = OutgoingBatch;
    type ResponseStream = EventBatches;
    type Future = std::future::Ready<Result<Response<EventBatches>, Status>>;

    fn call(&mut self, req: Request<pb::EventsRequest>) -> Self::Future {
        std::future::ready(self.0.event_batches(req).map(Response::new))
    }
}

impl HostServices {
    /// Opens the session's Events stream: one [`OutgoingBatch`] for each
    /// batch of events after the last ack, sent as the queue fills, until
    /// the client goes, the session ends or the host stops.
    fn event_batches(&self, req: Request<pb::EventsRequest>) -> Result<EventBatches, Status> {
        let host = self.0.clone();
        let session_id = req.into_inner().session_id;
        host.check_session(&session_id)?;
        let listener = host.queue.listener().map_err(|e| {
            Status::resource_exhausted(format!(
                "the host could not open a wake-up descriptor for this Events stream ({e}); try again"
            ))
        })?;
        let (superseded, interrupted) = {
            let mut slot = host.sessions();
            let session = slot
                .as_mut()
                .filter(|s| s.id == session_id)
                .ok_or_else(super::superseded)?;
            if session.events_open {
                return Err(Status::failed_precondition(
                    "an Events stream is already open for this session; one stream per session",
                ));
            }
            session.events_open = true;
            session.streamed = true;
            (session.superseded.clone(), session.interrupted.clone())
        };
        let (tx, rx) = mpsc::channel(4);
        let stopping = host.stopping.clone();
        tokio::spawn(async move {
            let mut cursor = host.queue.open_stream();
            tracing::debug!(plugin = host.name, after = cursor, "events stream opened");
            loop {
                let events = host
                    .queue
                    .batch_after(cursor, MAX_BATCH_EVENTS, MAX_BATCH_BYTES);
                if let Some(last) = events.last() {
                    cursor = last.seq;
                    let mut batch = OutgoingBatch::new(events);
                    batch.blank(host.unknown_seq.load(std::sync::atomic::Ordering::Relaxed));
                    tokio::select! {
                        sent = tx.send(Ok(batch)) => if sent.is_err() { break },
                        () = superseded.cancelled() => break,
                        () = interrupted.cancelled() => break,
                    }
                    if interrupted.is_cancelled() {
                        let _ = tx.try_send(Err(Status::unavailable(
                            "the host ended this Events stream; register again",
                        )));
                        break;
                    }
                    continue;
                }
                tokio::select! {
                    () = host.queue.wait_after(cursor, &listener) => {}
                    () = interrupted.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("the host ended this Events stream; register again")));
                        break;
                    }
                    () = superseded.cancelled() => {
                        let _ = tx.try_send(Err(super::superseded()));
                        break;
                    }
                    () = stopping.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("the host is shutting down")));
                        break;
                    }
                    () = tx.closed() => break,
                }
            }
            if let Some(s) = host.sessions().as_mut().filter(|s| s.id == session_id) {
                s.events_open = false;
            }
            tracing::debug!(plugin = host.name, at = cursor, "events stream closed");
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// How long the sidecar must have stayed caught up before the queue is
/// cleaned up.
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// After an Ack that caught up: in [`FORGET_AFTER`], if the sidecar is
/// still caught up (a burst has drained, nothing new came), forgets every
/// acked event and gives the queue's room and the allocator's free pages
/// back. Not at once: while a producer keeps pushing, a long clean-up would
/// hold the queue's stream-side lock against the Events stream and Acks
/// (and, when pushes shared that lock, made `handle_payload`'s p99 grow
/// tenfold); batches and acks forget a few events each meanwhile.
fn forget_later(host: &std::sync::Arc<super::Host>) {
    if host
        .forget_scheduled
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let host = host.clone();
    tokio::spawn(async move {
        tokio::time::sleep(FORGET_AFTER).await;
        host.forget_scheduled
            .store(false, std::sync::atomic::Ordering::Release);
        if host.queue.acked() == host.queue.last_seq() && host.queue.forget_acked() {
            // Glibc keeps freed pages otherwise; each plugin's bound is 64 MiB.
            give_back_freed_memory();
        }
    });
}

/// Returns the C allocator's free pages to the kernel (glibc's
/// `malloc_trim`); nothing elsewhere. A few milliseconds at most, on a
/// socket-server worker, once per drained burst.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases memory the
    // allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
