//! Limits that come from the mesh wire format, enforced on every message.

/// Length of a node id in bytes.
pub const NODE_ID_BYTES: usize = 16;
/// Length of an X25519 public key, and of the signing seed, in bytes.
pub const KEY_BYTES: usize = 32;
/// Longest `PluginPayload.kind`, in bytes (a `u8` length on the mesh wire).
pub const MAX_KIND_BYTES: usize = 255;
/// Largest `PluginPayload.body`, in bytes (a `u16` length on the mesh wire).
pub const MAX_BODY_BYTES: usize = 65_535;
/// Longest friendly name, in bytes of UTF-8 (a `u8` length on the mesh wire).
pub const MAX_NAME_BYTES: usize = 255;
/// Largest `Goodbye.reason` (one byte on the mesh wire).
pub const MAX_REASON: u32 = 255;
/// Largest plugin name, in bytes.
pub const MAX_PLUGIN_NAME_BYTES: usize = 64;
/// Most payload kinds one plugin claims.
pub const MAX_KINDS: usize = 64;
/// Longest `sdk_name` and `sdk_version`, in bytes.
pub const MAX_SDK_FIELD_BYTES: usize = 128;
/// Longest `session_id`, in bytes (the host issues 32 hex digits).
pub const MAX_SESSION_ID_BYTES: usize = 64;
/// Largest gRPC message either side decodes: the largest events batch the
/// host sends plus headroom. Any single request is far smaller.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest total body bytes the host puts in one `EventsResponse` batch.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most events the host puts in one `EventsResponse` batch. A batch holding
/// fewer (and under [`MAX_BATCH_BYTES`] of bodies) means no more were ready.
pub const MAX_BATCH_EVENTS: usize = 256;
