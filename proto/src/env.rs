//! Environment variables the host sets for a sidecar it spawns.

/// Path of the Unix socket the sidecar connects to.
pub const SOCKET: &str = "PIM_PLUGIN_SOCKET";
/// The number of an inherited descriptor from which a spawned sidecar
/// reads its token once (to end of file) and then closes: unlike the
/// environment, which `/proc/<pid>/environ` keeps showing, nothing is left
/// for another process to read.
pub const TOKEN_FD: &str = "PIM_PLUGIN_TOKEN_FD";
/// Secret bearer token for the `authorization` metadata of every call; the
/// fallback for clients that cannot read `PIM_PLUGIN_TOKEN_FD`, set only
/// when the daemon's configuration asks for it (`token_env`).
pub const TOKEN: &str = "PIM_PLUGIN_TOKEN";
/// Path of a file holding the token, for sidecars the host does not spawn.
pub const TOKEN_FILE: &str = "PIM_PLUGIN_TOKEN_FILE";
/// The plugin name the host expects in `Register`.
pub const NAME: &str = "PIM_PLUGIN_NAME";
/// The protocol version the host speaks, in decimal.
pub const PROTOCOL_VERSION: &str = "PIM_PLUGIN_PROTOCOL_VERSION";
