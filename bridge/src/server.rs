//! The server on the plugin's socket: the four `pim.plugin.v1` services,
//! health, and reflection (v1 and v1alpha), as tonic services served over
//! HTTP/2 by hyper.

use std::any::Any;
use std::convert::Infallible;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use pim_plugin_proto::limits::MAX_MESSAGE_BYTES;
use pim_plugin_proto::pb::control_sender_server::ControlSenderServer;
use pim_plugin_proto::pb::identity_secrets_server::IdentitySecretsServer;
use pim_plugin_proto::pb::peer_directory_server::PeerDirectoryServer;
use pim_plugin_proto::{FILE_DESCRIPTOR_SET, SERVICE_NAMES};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::Status;
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::config::ConnectionLimits;
use crate::conn::Conn;
use crate::host::{allowed_uids, AuthCheck, Host, HostServices, SessionServer};
use crate::repoll::{self, Repoll};

/// Where [`built_once`] keeps a value: a `static` of its call site.
type Slot = OnceLock<Box<dyn Any + Send + Sync>>;

/// A value built once per process and cloned for every plugin.
///
/// The reflection services take about 0.4 ms each to build (they decode and
/// index the descriptor sets) and are the same for every plugin, so the
/// first build is kept. Their types are `impl Trait` and cannot be written
/// in a `static`, so the slot holds the value as `dyn Any`, and this
/// downcasts it back to the type that the call site's `build` returns.
fn built_once<T, E>(slot: &'static Slot, build: impl FnOnce() -> Result<T, E>) -> Result<T, E>
where
    T: Clone + Send + Sync + 'static,
{
    if let Some(kept) = slot.get() {
        return Ok(kept
            .downcast_ref::<T>()
            .expect("a slot is filled only by its own call site, with this type")
            .clone());
    }
    let value = build()?;
    // Two plugins starting at once may both build it; either copy will do.
    let _ = slot.set(Box::new(value.clone()));
    Ok(value)
}

/// Starts serving on `listener` until `stopping` is cancelled.
pub(crate) fn serve(
    host: Arc<Host>,
    token: Arc<str>,
    listener: UnixListener,
    stopping: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let services = HostServices(host.clone());
    static REFLECTION_V1: Slot = OnceLock::new();
    static REFLECTION_V1ALPHA: Slot = OnceLock::new();
    let reflection_v1 = built_once(&REFLECTION_V1, || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
    })?;
    let reflection_v1alpha = built_once(&REFLECTION_V1ALPHA, || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
    })?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let plugin = host.name;
    let limits = host.config.connections;
    let uids = allowed_uids(&host.config.allowed_uids);
    let admission = crate::conn::Admission {
        max: limits.max_connections,
        timeout: limits.admission_timeout,
        sidecar_pid: host.sidecar_pid.clone(),
    };
    let routes = Routes::new(SessionServer::new(services.clone()))
        .add_service(
            PeerDirectoryServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ControlSenderServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            IdentitySecretsServer::new(services).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let checked = InterceptedService::new(routes, AuthCheck::new(token, plugin, uids));
    let serve = async move |listener: UnixListener| {
        for service in SERVICE_NAMES.into_iter().chain([""]) {
            health_reporter
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        let incoming = crate::conn::incoming(listener, admission, plugin, stopping.clone());
        serve_connections(incoming, checked, limits, stopping).await;
    };
    if !host.config.server_thread {
        return Ok(tokio::spawn(serve(listener)));
    }
    // On the daemon's socket-server runtime. The listener moves to that
    // runtime so its connections are driven there.
    let listener = listener.into_std()?;
    let runtime = server_runtime()?;
    let hard_stop = CancellationToken::new();
    let stop = hard_stop.clone();
    let served = runtime.spawn(
        async move {
            let listener = match UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(plugin, error = %e, "moving the socket to its server thread failed");
                    return;
                }
            };
            tokio::select! {
                () = serve(listener) => {}
                () = stop.cancelled() => {}
            }
        }
        .in_current_span(),
    );
    // Dropping (or aborting) this task ends the server at once.
    Ok(tokio::spawn(async move {
        let _stop_on_drop = hard_stop.drop_guard();
        let _ = served.await;
    }))
}

/// The plugin's services behind the uid and token check.
type Checked = InterceptedService<Routes, AuthCheck>;

/// Serves each connection `incoming` yields over HTTP/2 until `stopping`
/// is cancelled, then lets the open ones finish their calls (a graceful
/// HTTP/2 shutdown) and returns when all have closed.
///
/// hyper serves each connection in a task and each of its streams in a
/// task of their own; both are [`Repoll`]ed, which spares the work-stealing
/// runtime a thread woken for every batch of events sent and every call
/// answered (see `repoll`).
async fn serve_connections(
    mut incoming: mpsc::Receiver<Conn>,
    checked: Checked,
    limits: ConnectionLimits,
    stopping: CancellationToken,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(repoll::Executor);
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        // hyper's default, said here because it is a limit a client meets:
        // a connection whose peer made the server reset this many streams
        // (protocol errors, refused streams) is closed with GOAWAY
        // (RUSTSEC-2024-0003). A client that keeps to the server's stream
        // limit, as gRPC clients do, never comes near it.
        .max_local_error_reset_streams(Some(1024));
    let request_timeout = limits.request_timeout;
    let mut connections = JoinSet::new();
    // `incoming` ends when `stopping` is cancelled; connections it still
    // holds then are closed unserved.
    while let Some(conn) = incoming.recv().await {
        if stopping.is_cancelled() {
            break;
        }
        while connections.try_join_next().is_some() {}
        let info = conn.info();
        let checked = checked.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(info.clone());
            call(checked.clone(), request, request_timeout)
        });
        let connection = http2.serve_connection(TokioIo::new(conn), service);
        let stopping = stopping.clone();
        connections.spawn(Repoll::new(async move {
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "serving a connection failed");
            }
        }));
    }
    while connections.join_next().await.is_some() {}
}

/// One call: answered by `checked`, or `CANCELLED` when no answer began
/// within `server_timeout` or the client's `grpc-timeout`, whichever is
/// shorter. (A streaming answer's messages are not timed, only its start.)
async fn call(
    mut checked: Checked,
    request: Request<Incoming>,
    server_timeout: Duration,
) -> Result<Response<Body>, Infallible> {
    let timeout = grpc_timeout(request.headers()).map_or(server_timeout, |t| t.min(server_timeout));
    std::future::poll_fn(|cx| Service::<Request<Incoming>>::poll_ready(&mut checked, cx)).await?;
    Ok(
        match tokio::time::timeout(timeout, checked.call(request)).await {
            Ok(response) => response?.map(Body::new),
            Err(_) => Status::cancelled("Timeout expired").into_http(),
        },
    )
}

/// The client's `grpc-timeout` header: at most 8 digits and a unit (`H`,
/// `M`, `S`, `m`, `u`, `n`), as gRPC over HTTP/2 defines it. `None` when
/// absent or malformed (then the server's own timeout applies).
fn grpc_timeout(headers: &hyper::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The daemon's socket-server runtime, shared by all its plugins, started
/// at the first plugin: one worker thread per CPU, at most
/// [`MAX_SERVER_THREADS`], so that the daemon's thread count does not grow
/// with its plugins. Its workers steal work from each other, so no plugin
/// is bound to one thread: with several busy plugins, whichever worker the
/// kernel runs serves whichever plugin is ready (with a single-threaded
/// runtime per thread, the plugins of a thread that got less CPU got half
/// the share of the others). A plugin's server is all asynchronous: a
/// plugin whose sidecar stalls or floods its socket holds no thread.
fn server_runtime() -> std::io::Result<tokio::runtime::Handle> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(server_threads())
                .thread_name("pim-sidecar-server")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map(|runtime| runtime.handle().clone())
        .map_err(|e| std::io::Error::other(format!("starting the socket-server runtime: {e}")))
}

/// Most socket-server threads a daemon runs: its plugins' sockets are
/// served by one worker per CPU, up to this many, whatever the number of
/// plugins.
pub const MAX_SERVER_THREADS: usize = 4;

/// How many socket-server threads this daemon runs: one per CPU, at most
/// [`MAX_SERVER_THREADS`].
pub fn server_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_SERVER_THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn a_clients_grpc_timeout_is_read_in_every_unit_and_a_malformed_one_is_ignored() {
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout_of("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout_of("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "S",
            "123456789S",
            "5s",
            "-5S",
            "+5S",
            "5",
            "1.5S",
            "5 S",
        ] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&hyper::HeaderMap::new()), None);
    }
}
