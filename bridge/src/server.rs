//! The tonic server on the plugin's socket: the four `pim.plugin.v1`
//! services, health, and reflection (v1 and v1alpha).

use std::any::Any;
use std::sync::{Arc, OnceLock};

use pim_plugin_proto::limits::MAX_MESSAGE_BYTES;
use pim_plugin_proto::pb::control_sender_server::ControlSenderServer;
use pim_plugin_proto::pb::identity_secrets_server::IdentitySecretsServer;
use pim_plugin_proto::pb::peer_directory_server::PeerDirectoryServer;
use pim_plugin_proto::pb::plugin_session_server::PluginSessionServer;
use pim_plugin_proto::{FILE_DESCRIPTOR_SET, SERVICE_NAMES};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::InterceptorLayer;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::host::{allowed_uids, AuthCheck, Host, HostServices};

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
    let router = Server::builder()
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .timeout(limits.request_timeout)
        .layer(InterceptorLayer::new(AuthCheck::new(token, plugin, uids)))
        .add_service(
            PluginSessionServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
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
        .add_service(reflection_v1alpha);
    let serve = async move |listener: UnixListener| {
        for service in SERVICE_NAMES.into_iter().chain([""]) {
            health_reporter
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        let incoming = crate::conn::incoming(listener, admission, plugin, stopping.clone());
        let shutdown = stopping.clone();
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(plugin, error = %e, "sidecar socket server failed");
        }
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
