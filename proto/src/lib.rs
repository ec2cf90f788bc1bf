#![doc = include_str!("../README.md")]
//!
//! Wire protocol of out-of-process `pim-daemon` plugins (package `pim.plugin.v1`).
//!
//! This crate holds the `.proto` files' generated code ([`pb`]), the limits
//! of the mesh wire format ([`limits`]), and every conversion between wire
//! messages and the domain types of `pim-core`, `pim-protocol` and
//! `pim-plugin` ([`convert`]). Conversions from the wire are `TryFrom` and
//! check every limit, failing with an [`InvalidField`] that names the field;
//! conversions to the wire are `From`. [`batch`] reads an Events batch one
//! event at a time from its bytes, with the same checks.
//!
//! The daemon side (`pim-plugin-bridge`) and the plugin side (`pim-sidecar`)
//! share this crate, so both validate the same way.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backoff;
pub mod batch;
pub mod codec;
pub mod convert;
pub mod env;
mod error;
pub mod limits;

pub use error::InvalidField;
pub use tonic;

/// Generated prost messages and tonic services for `pim.plugin.v1`. Their
/// docs are the .proto comments, written for readers of the protocol (and
/// of `grpcurl describe`), where `<plugin name>` is a placeholder, not HTML.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
#[allow(rustdoc::invalid_html_tags)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/pim.plugin.v1.rs"));
}

/// Generated protobuf messages, clients (`*_client`) and servers (`*_server`).
pub mod pb {
    pub use crate::generated::*;
}

/// Protocol version spoken by this crate; sent in `RegisterRequest.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Encoded `FileDescriptorSet` of every `pim.plugin.v1` file, with comments,
/// for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pim_plugin_v1_descriptor.bin"));

/// Exit status of a sidecar whose Register the host refused (a wrong name,
/// kinds or protocol version): a configuration problem that a restart cannot
/// fix, so the supervisor does not restart it. (`EX_CONFIG` of sysexits.h.)
pub const EXIT_REFUSED: u8 = 78;

/// Fully qualified names of the four `pim.plugin.v1` services.
pub const SERVICE_NAMES: [&str; 4] = [
    "pim.plugin.v1.PluginSession",
    "pim.plugin.v1.PeerDirectory",
    "pim.plugin.v1.ControlSender",
    "pim.plugin.v1.IdentitySecrets",
];
