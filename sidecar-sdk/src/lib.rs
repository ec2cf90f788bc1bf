#![doc = include_str!("../README.md")]

mod adapter;
mod connect;
mod error;
mod host_client;
mod once;
mod poll;
mod run;
mod sidecar;

pub use adapter::{run_daemon_plugin, DaemonPluginSidecar, HostPorts};
pub use connect::{
    connect_channel, default_busy_poll, read_token_file, ConnectOptions, BUSY_POLL_ENV,
    TAKEOVER_ENV,
};
pub use error::HostError;
pub use host_client::{HostClient, HostSession, PeerWatch};
pub use once::{Applied, EventInfo, Retry, RETRIES};
pub use pim_plugin::{PeerDirectoryEvent, PeerInfoSource};
pub use pim_plugin_proto as proto;
pub use pim_plugin_proto::convert::WatchEvent;
pub use pim_plugin_proto::pb::Capability;
pub use poll::busy_poll;
pub use run::{run, run_async, RegisterRefused};
pub use sidecar::{Context, Sidecar};
pub use tokio_util::sync::CancellationToken;
pub use {
    anyhow, async_trait::async_trait, bytes::Bytes, pim_core::NodeId, pim_plugin,
    pim_protocol::ControlFrame, tonic,
};
