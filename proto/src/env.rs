//! Environment variables the host sets for a sidecar it spawns.

/// Path of the Unix socket the sidecar connects to.
pub const SOCKET: &str = "PIM_PLUGIN_SOCKET";
/// Secret bearer token for the `authorization` metadata of every call.
pub const TOKEN: &str = "PIM_PLUGIN_TOKEN";
/// Path of a file holding the token, for sidecars the host does not spawn.
pub const TOKEN_FILE: &str = "PIM_PLUGIN_TOKEN_FILE";
/// The plugin name the host expects in `Register`.
pub const NAME: &str = "PIM_PLUGIN_NAME";
/// The protocol version the host speaks, in decimal.
pub const PROTOCOL_VERSION: &str = "PIM_PLUGIN_PROTOCOL_VERSION";
