//! Connecting to the plugin socket and reading the `PIM_PLUGIN_*` environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use pim_plugin_proto::{env, PROTOCOL_VERSION};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Where and how to reach the host.
#[derive(Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// The plugin socket.
    pub socket: PathBuf,
    /// The secret token.
    pub token: String,
    /// The file the token was read from, read again before each reconnect
    /// (a restarted host writes a new token there).
    pub token_file: Option<PathBuf>,
    /// Whether the host spawned this process (the token came through
    /// `PIM_PLUGIN_TOKEN_FD` or `PIM_PLUGIN_TOKEN`). A spawned sidecar gives up on a lost host after
    /// `reconnect_timeout`; one that runs on its own retries forever.
    pub spawned: bool,
    /// How long to keep retrying a lost host before exiting. `None` retries
    /// forever. Default: 5 s for a spawned sidecar, forever otherwise.
    pub reconnect_timeout: Option<Duration>,
    /// How long a host call polls for its answer before the runtime may
    /// sleep (see [`HostClient::with_busy_poll`](crate::HostClient::with_busy_poll)).
    /// Default: [`default_busy_poll`], or `PIM_SIDECAR_BUSY_POLL_US`
    /// microseconds when that is set (`0` turns it off).
    pub busy_poll: Duration,
    /// Whether the first Register takes the session over from a live
    /// client (`PIM_PLUGIN_TAKEOVER=1`): for a process started by hand to
    /// replace a running sidecar. Never used when registering again after
    /// a lost stream. Default false: with a live client, Register waits.
    pub takeover: bool,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("socket", &self.socket)
            .field("token", &"<redacted>")
            .field("token_file", &self.token_file)
            .field("spawned", &self.spawned)
            .field("reconnect_timeout", &self.reconnect_timeout)
            .field("busy_poll", &self.busy_poll)
            .field("takeover", &self.takeover)
            .finish()
    }
}

impl ConnectOptions {
    /// Options for a sidecar that runs on its own (not spawned by the
    /// host): `socket`, `token`, retrying a lost host forever, the
    /// [default busy poll](default_busy_poll), no takeover. Set the public
    /// fields to change them; [`ConnectOptions::from_env`] reads them from
    /// the `PIM_PLUGIN_*` variables instead.
    pub fn new(socket: impl Into<PathBuf>, token: impl Into<String>) -> Self {
        Self {
            socket: socket.into(),
            token: token.into(),
            token_file: None,
            spawned: false,
            reconnect_timeout: None,
            busy_poll: default_busy_poll(),
            takeover: false,
        }
    }

    /// Reads `PIM_PLUGIN_SOCKET` and the token: from the descriptor named by
    /// `PIM_PLUGIN_TOKEN_FD` (read to its end and closed), else
    /// `PIM_PLUGIN_TOKEN`, else the file named by `PIM_PLUGIN_TOKEN_FILE`.
    /// Removes `PIM_PLUGIN_TOKEN_FD` and `PIM_PLUGIN_TOKEN` from this
    /// process's environment so that children do not inherit them. Call it
    /// before starting other threads.
    pub fn from_env() -> anyhow::Result<Self> {
        let socket = std::env::var_os(env::SOCKET).ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not set: this program is a pim-daemon sidecar; the daemon starts it, or set {} (and {} or {}) to run it on its own",
                env::SOCKET,
                env::SOCKET,
                env::TOKEN,
                env::TOKEN_FILE
            )
        })?;
        if let Some(v) = std::env::var_os(env::PROTOCOL_VERSION) {
            let theirs = v.to_string_lossy();
            if theirs != PROTOCOL_VERSION.to_string() {
                anyhow::bail!(
                    "the host speaks plugin protocol version {theirs} ({}), this SDK speaks {PROTOCOL_VERSION}",
                    env::PROTOCOL_VERSION
                );
            }
        }
        let from_fd = std::env::var_os(env::TOKEN_FD);
        if from_fd.is_some() {
            // As below: `run` calls this before it builds its runtime.
            std::env::remove_var(env::TOKEN_FD);
        }
        let (token, token_file, spawned) = match (from_fd, std::env::var(env::TOKEN)) {
            (Some(fd), _) => {
                std::env::remove_var(env::TOKEN);
                (read_token_fd(&fd.to_string_lossy())?, None, true)
            }
            (None, Ok(token)) => {
                // Children must not inherit the token. Modifying the environment
                // is sound only while no other thread reads it: `run` calls this
                // before it builds its runtime.
                std::env::remove_var(env::TOKEN);
                (checked_token(token.trim(), env::TOKEN)?, None, true)
            }
            (None, Err(_)) => {
                let file = std::env::var_os(env::TOKEN_FILE).ok_or_else(|| {
                    anyhow::anyhow!(
                        "none of {}, {} and {} is set",
                        env::TOKEN_FD,
                        env::TOKEN,
                        env::TOKEN_FILE
                    )
                })?;
                let file = PathBuf::from(file);
                (read_token_file(&file)?, Some(file), false)
            }
        };
        Ok(Self {
            socket: socket.into(),
            token,
            token_file,
            spawned,
            reconnect_timeout: spawned.then(|| Duration::from_secs(5)),
            busy_poll: busy_poll_from_env()?,
            takeover: takeover_from_env()?,
        })
    }
}

/// Environment variable that sets [`ConnectOptions::takeover`]: `1` or
/// `true` to take the session over from a live client.
pub const TAKEOVER_ENV: &str = "PIM_PLUGIN_TAKEOVER";

fn takeover_from_env() -> anyhow::Result<bool> {
    match std::env::var(TAKEOVER_ENV).as_deref() {
        Err(_) | Ok("" | "0" | "false") => Ok(false),
        Ok("1" | "true") => Ok(true),
        Ok(other) => anyhow::bail!("{TAKEOVER_ENV}={other:?}: expected 1, true, 0 or false"),
    }
}

/// Reads the token from the inherited descriptor `fd` to its end, and
/// closes it.
fn read_token_fd(fd: &str) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let n: libc::c_int = fd.trim().parse().ok().filter(|n| *n > 2).ok_or_else(|| {
        anyhow::anyhow!(
            "{}={fd:?} is not a descriptor number above 2",
            env::TOKEN_FD
        )
    })?;
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        anyhow::bail!(
            "{}={n}, but descriptor {n} is not open: the host passes it to the process it spawns",
            env::TOKEN_FD
        );
    }
    // SAFETY: the host opened this descriptor for this process to read the
    // token from, once; nothing else in the process owns or uses it, and
    // the File closes it.
    let mut file = unsafe { std::fs::File::from_raw_fd(n) };
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(|e| {
        anyhow::anyhow!(
            "reading the token from descriptor {n} ({}): {e}",
            env::TOKEN_FD
        )
    })?;
    checked_token(token.trim(), &format!("{} (descriptor {n})", env::TOKEN_FD))
}

/// Environment variable that sets [`ConnectOptions::busy_poll`], in
/// microseconds.
pub const BUSY_POLL_ENV: &str = "PIM_SIDECAR_BUSY_POLL_US";

/// The largest busy-poll budget accepted from [`BUSY_POLL_ENV`].
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// The default busy-poll budget: 100 µs on a machine with two CPUs or
/// more, none on a single CPU (where polling would only keep the host from
/// running). The CPUs are counted once per process: counting them reads
/// cgroup files, which cost a new sidecar 0.3 ms of its start-up.
pub fn default_busy_poll() -> Duration {
    static BUDGET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus > 1 {
            Duration::from_micros(100)
        } else {
            Duration::ZERO
        }
    })
}

fn busy_poll_from_env() -> anyhow::Result<Duration> {
    match std::env::var_os(BUSY_POLL_ENV) {
        Some(raw) => parse_busy_poll(&raw.to_string_lossy()),
        None => Ok(default_busy_poll()),
    }
}

/// Parses a [`BUSY_POLL_ENV`] value: whole microseconds, at most 10 ms.
fn parse_busy_poll(raw: &str) -> anyhow::Result<Duration> {
    let us: u64 = raw.trim().parse().map_err(|_| {
        anyhow::anyhow!("{BUSY_POLL_ENV}={raw:?}: expected a whole number of microseconds")
    })?;
    let budget = Duration::from_micros(us);
    if budget > MAX_BUSY_POLL {
        anyhow::bail!(
            "{BUSY_POLL_ENV}={us}: at most {} microseconds",
            MAX_BUSY_POLL.as_micros()
        );
    }
    Ok(budget)
}

/// Reads a token file, which must not be readable by group or others.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "token file {} has mode {mode:o}; it must be 0600 or stricter",
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
    checked_token(token.trim(), &format!("token file {}", path.display()))
}

/// A token as the host hands them out: printable ASCII, not empty. Anything
/// else cannot go into the `authorization` metadata; the error names where
/// it came from.
pub(crate) fn checked_token(token: &str, source: &str) -> anyhow::Result<String> {
    if token.is_empty() {
        anyhow::bail!("{source}: the token is empty");
    }
    if let Some(at) = token.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        anyhow::bail!("{source}: the token has a byte that is not printable ASCII at offset {at}");
    }
    Ok(token.to_owned())
}

/// Opens a gRPC channel over the Unix socket at `path`, with the
/// `:authority` `localhost` (a socket path is not a valid authority).
pub async fn connect_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{checked_token, parse_busy_poll, ConnectOptions, BUSY_POLL_ENV};

    #[test]
    fn options_for_a_sidecar_on_its_own() {
        let o = ConnectOptions::new("/run/p/echo.sock", "00ff");
        assert_eq!(o.socket.to_str(), Some("/run/p/echo.sock"));
        assert_eq!(o.token, "00ff");
        assert!(!o.spawned && !o.takeover && o.reconnect_timeout.is_none());
        assert!(!format!("{o:?}").contains("00ff"), "the token is redacted");
    }

    #[test]
    fn busy_poll_budget_from_the_environment() {
        assert_eq!(parse_busy_poll("250").unwrap(), Duration::from_micros(250));
        let e = checked_token("ab\u{7}cd", "PIM_PLUGIN_TOKEN")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "PIM_PLUGIN_TOKEN: the token has a byte that is not printable ASCII at offset 2"
            ),
            "{e}"
        );
        assert!(checked_token("", "x")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert_eq!(checked_token("00ff", "x").unwrap(), "00ff");
        assert_eq!(parse_busy_poll(" 0 ").unwrap(), Duration::ZERO);
        let e = parse_busy_poll("fast").unwrap_err().to_string();
        assert!(
            e.contains(BUSY_POLL_ENV) && e.contains("microseconds"),
            "{e}"
        );
        let e = parse_busy_poll("10001").unwrap_err().to_string();
        assert!(
            e.contains(BUSY_POLL_ENV) && e.contains("at most 10000"),
            "{e}"
        );
        assert_eq!(parse_busy_poll("10000").unwrap(), Duration::from_millis(10));
    }
}
