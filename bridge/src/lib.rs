#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
//!
//! ```no_run
//! use std::sync::Arc;
//! use pim_plugin::DaemonPlugin;
//! use pim_plugin_bridge::{CommandSpec, SidecarConfig, SidecarPlugin};
//!
//! # fn demo() -> Result<(), pim_plugin_bridge::ConfigError> {
//! let config = SidecarConfig::spawn(
//!     "echo",
//!     ["echo.ping", "echo.pong"],
//!     "/run/pim/plugins",
//!     CommandSpec::new("/usr/lib/pim/echo-sidecar"),
//! );
//! let plugin: Arc<dyn DaemonPlugin> = Arc::new(SidecarPlugin::new(config)?);
//! // hand `plugin` to the daemon like any in-process plugin
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod doorbell;
mod end;
pub mod file;
mod host;
mod kinds;
mod output;
mod overflow;
mod plugin;
mod queue;
mod repoll;
mod sandbox;
mod secret;
mod server;
mod socket;
mod supervisor;
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
mod watchdog;

pub use config::{
    CommandSpec, ConfigError, ConnectionLimits, DataDir, Grants, Launch, QueueLimits,
    RestartPolicy, SidecarConfig, MAX_DURATION, MIN_STUCK_TIMEOUT,
};
pub use end::{EndReason, ProcessEnd};
pub use pim_plugin;
pub use pim_plugin_proto as proto;
pub use plugin::{SidecarPlugin, SidecarStats};
pub use queue::{QueueBudget, QueueStats, EVENT_OVERHEAD_BYTES};
pub use sandbox::{default_denied_syscalls, Enforcement, ResourceLimits, Sandbox, SandboxReport};
pub use server::{server_threads, MAX_SERVER_THREADS};

#[cfg(test)]
mod alloc_probe;
