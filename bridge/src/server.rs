//! The tonic server on the plugin's socket: the four `pim.plugin.v1`
//! services, health, and reflection (v1 and v1alpha).

use std::sync::Arc;

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

use crate::host::{AuthCheck, Host, HostServices};

/// Starts serving on `listener` until `stopping` is cancelled.
pub(crate) fn serve(
    host: Arc<Host>,
    token: Arc<str>,
    listener: UnixListener,
    stopping: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let services = HostServices(host.clone());
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let plugin = host.name;
    let limits = host.config.connections;
    let router = Server::builder()
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .timeout(limits.request_timeout)
        .layer(InterceptorLayer::new(AuthCheck::new(
            token,
            plugin,
            host.config.allowed_uids.clone(),
        )))
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
    Ok(tokio::spawn(async move {
        for service in SERVICE_NAMES.into_iter().chain([""]) {
            health_reporter
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        let incoming =
            crate::socket::incoming(listener, limits.max_connections, plugin, stopping.clone());
        let shutdown = stopping.clone();
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(plugin, error = %e, "sidecar socket server failed");
        }
    }))
}
