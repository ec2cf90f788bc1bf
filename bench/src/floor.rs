//! The floors: a plain tonic server (no auth, no session, no queue) for the
//! raw stream and raw unary measurements, and a raw Unix-socket echo.

use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;

use pim_sidecar::proto::pb;
use pim_sidecar::proto::pb::peer_directory_server::{PeerDirectory, PeerDirectoryServer};
use pim_sidecar::proto::pb::plugin_session_server::{PluginSession, PluginSessionServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

/// The raw stream's server side: Events streams whatever is fed into the
/// channel, one message per item; Ack reports the end.
pub(crate) struct FloorSession {
    events: Mutex<Option<mpsc::Receiver<Result<pb::EventsResponse, Status>>>>,
    opened: Mutex<Option<oneshot::Sender<()>>>,
    acked: Mutex<Option<oneshot::Sender<u64>>>,
}

type EventsStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::EventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PluginSession for FloorSession {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(pb::RegisterResponse::default()))
    }

    type EventsStream = EventsStream;

    async fn events(
        &self,
        _: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let rx = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Status::failed_precondition("one stream per run"))?;
        if let Some(opened) = self.opened.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = opened.send(());
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let seq = req.into_inner().seq;
        if let Some(acked) = self.acked.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = acked.send(seq);
        }
        Ok(Response::new(pb::AckResponse { acked_seq: seq }))
    }
}

/// The raw unary floor: LookupX25519 answers at once.
struct FloorPeers;

#[tonic::async_trait]
impl PeerDirectory for FloorPeers {
    async fn lookup_x25519(
        &self,
        _: Request<pb::LookupX25519Request>,
    ) -> Result<Response<pb::LookupX25519Response>, Status> {
        Ok(Response::new(pb::LookupX25519Response { x25519: None }))
    }

    async fn lookup_name(
        &self,
        _: Request<pb::LookupNameRequest>,
    ) -> Result<Response<pb::LookupNameResponse>, Status> {
        Ok(Response::new(pb::LookupNameResponse { name: None }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not a floor"))
    }
}

/// Handles of one floor server run.
pub(crate) struct Floor {
    /// Feed of the raw stream.
    pub(crate) feed: mpsc::Sender<Result<pb::EventsResponse, Status>>,
    /// Fires when the client opened the stream.
    pub(crate) opened: oneshot::Receiver<()>,
    /// Fires with the client's final ack.
    pub(crate) acked: oneshot::Receiver<u64>,
}

/// How a floor server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// A thread of its own with a single-threaded runtime: the simplest
    /// server, as a floor should be.
    OneThread,
    /// A work-stealing runtime with as many workers as the host's socket
    /// server has ([`server_threads`](pim_plugin_bridge::server_threads)): what
    /// that kind of runtime costs a plain tonic stream, shown beside the
    /// floor.
    WorkStealing,
}

/// Serves the floor services on `path` until the process ends, on a
/// thread of its own with a single-threaded runtime.
pub(crate) fn serve(path: &Path) -> anyhow::Result<Floor> {
    serve_on(path, Flavor::OneThread)
}

/// Serves the floor services on `path` until the process ends, on a
/// runtime of `flavor`.
pub(crate) fn serve_on(path: &Path, flavor: Flavor) -> anyhow::Result<Floor> {
    let (feed, rx) = mpsc::channel(1024);
    let (opened_tx, opened) = oneshot::channel();
    let (acked_tx, acked) = oneshot::channel();
    let session = FloorSession {
        events: Mutex::new(Some(rx)),
        opened: Mutex::new(Some(opened_tx)),
        acked: Mutex::new(Some(acked_tx)),
    };
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    // (The host's plugins share a work-stealing runtime, which wakes a
    // second worker for each wake from outside it: docs/BENCHMARKS.md.)
    // Built last, so that no early return drops it inside the caller's
    // runtime.
    let runtime = match flavor {
        Flavor::OneThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::WorkStealing => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(pim_plugin_bridge::server_threads());
            builder
        }
    }
    .enable_all()
    .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).expect("the floor socket");
            let router = tonic::transport::Server::builder()
                .add_service(PluginSessionServer::new(session))
                .add_service(PeerDirectoryServer::new(FloorPeers));
            // On the work-stealing runtime the server runs on a worker, as
            // the host's does (block_on's own thread is not one).
            let served =
                tokio::spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
            let _ = served.await;
        });
    });
    Ok(Floor {
        feed,
        opened,
        acked,
    })
}

/// A raw Unix-socket echo of 64-byte messages on `path`.
pub(crate) fn serve_echo(path: &Path) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::bind(path)?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while stream.read_exact(&mut buf).await.is_ok() {
                    if stream.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}
