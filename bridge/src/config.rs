//! Configuration of one sidecar plugin.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use pim_plugin_proto::limits::MAX_BODY_BYTES;
use pim_plugin_proto::{convert, InvalidField};

use crate::sandbox::Sandbox;

/// How the sidecar process comes to exist.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Launch {
    /// The bridge spawns and supervises this command.
    Spawn(CommandSpec),
    /// The sidecar is started by someone else (systemd, a shell, a debugger)
    /// and connects to the socket on its own.
    External,
}

/// A command the bridge spawns as the sidecar.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CommandSpec {
    /// Program to run (a path, or a name looked up in the host's `PATH`).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables. The sidecar starts with an empty
    /// environment plus these, the ones named in `inherit_env`, and the
    /// `PIM_PLUGIN_*` variables.
    pub env: Vec<(OsString, OsString)>,
    /// Names of the host's environment variables passed through (for
    /// example `RUST_LOG`); none by default.
    pub inherit_env: Vec<OsString>,
    /// Working directory; the host's when `None`.
    pub current_dir: Option<PathBuf>,
}

impl CommandSpec {
    /// A command with no arguments and no extra environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: Vec::new(),
            current_dir: None,
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes the host's value of `key`, if set, through to the sidecar.
    #[must_use]
    pub fn inherit(mut self, key: impl Into<OsString>) -> Self {
        self.inherit_env.push(key.into());
        self
    }
}

/// Rights beyond the defaults. By default a plugin may look up peers, watch
/// the directory and send `PluginPayload` frames in its own namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grants {
    /// May read the node's signing seed (`IdentitySecrets.SigningSeed`).
    pub signing_seed: bool,
    /// May send every `ControlFrame` variant, and payloads of any kind.
    pub raw_control: bool,
}

impl Grants {
    /// The sidecars file's names of the granted capabilities
    /// (`signing_seed`, `raw_control`).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.signing_seed {
            names.push("signing_seed");
        }
        if self.raw_control {
            names.push("raw_control");
        }
        names
    }
}

/// Bounds of the per-plugin event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueLimits {
    /// Most events kept (sent or not, until acked). Default 65,536.
    pub max_events: usize,
    /// Most bytes kept, counting each event's body and kind plus
    /// [`crate::EVENT_OVERHEAD_BYTES`]. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_events: 65_536,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// When and how often a spawned sidecar that exits is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// Most restarts within `window` before the plugin is marked failed.
    /// Default 5.
    pub max_restarts: u32,
    /// The crash-loop window. Default 60 s.
    pub window: Duration,
    /// Delay before the first restart; doubles after each, plus up to 25%
    /// jitter. Default 100 ms.
    pub initial_backoff: Duration,
    /// Longest delay between restarts. Default 10 s.
    pub max_backoff: Duration,
    /// A failed plugin (crash loop, refused Register, a command that cannot
    /// be spawned) is started again after this long, with a fresh crash-loop
    /// count. Default 5 minutes; `None` leaves it down until
    /// [`crate::SidecarPlugin::restart`].
    pub retry_failed_after: Option<Duration>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            retry_failed_after: Some(Duration::from_secs(300)),
        }
    }
}

/// Where a plugin keeps its own files: `RegisterResponse.data_dir`, the
/// SDK's `Context::data_dir`, and the `PluginContext::data_dir` of a plugin
/// run unchanged out of process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataDir {
    /// `<daemon data_dir>/plugins/<name>/`, created 0700 at start (the
    /// default): the plugin sees none of the daemon's files.
    #[default]
    Own,
    /// The daemon's own data directory, for a plugin that takes over a
    /// daemon file such as `messages.db`. Only when configured explicitly.
    Daemon,
    /// This directory, created 0700 at start if it does not exist.
    Path(PathBuf),
}

impl DataDir {
    /// The directory for plugin `name` of a daemon whose data directory is
    /// `daemon_dir`.
    pub fn resolve(&self, daemon_dir: &std::path::Path, name: &str) -> PathBuf {
        match self {
            Self::Own => daemon_dir.join("plugins").join(name),
            Self::Daemon => daemon_dir.to_owned(),
            Self::Path(path) => path.clone(),
        }
    }
}

/// Bounds on what connections to one plugin socket may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// Connections open at once. When all are taken, a new connection
    /// closes the oldest one that has not made an authenticated call yet;
    /// when every one has, the new one is closed. Default 16.
    pub max_connections: usize,
    /// A connection that has made no authenticated call (uid and token
    /// checked) this long after it was accepted is closed. Default 1 s.
    pub admission_timeout: Duration,
    /// Concurrent calls (HTTP/2 streams) per connection. Default 64.
    pub max_streams_per_connection: u32,
    /// Idle time after which the host pings a connection. Default 20 s.
    pub keepalive_interval: Duration,
    /// A connection that does not answer a ping within this is closed.
    /// Default 10 s.
    pub keepalive_timeout: Duration,
    /// Longest time a call may take to produce its response (a stream's
    /// messages are not bounded by it); a client's shorter `grpc-timeout`
    /// wins. A call that runs out ends with `CANCELLED` ("Timeout
    /// expired"). Default 30 s.
    pub request_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            admission_timeout: Duration::from_secs(1),
            max_streams_per_connection: 64,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything the bridge needs to host one sidecar plugin.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SidecarConfig {
    /// Plugin name: the `DaemonPlugin::name`, the socket file name and the
    /// prefix of the kinds the plugin may send.
    pub name: String,
    /// Payload kinds the plugin claims, in the daemon's dispatch order.
    pub payload_kinds: Vec<String>,
    /// Directory of the socket `<socket_dir>/<name>.sock`; created 0700.
    pub socket_dir: PathBuf,
    /// Spawned or external.
    pub launch: Launch,
    /// Extra rights.
    pub grants: Grants,
    /// Where the plugin keeps its files. Default: a directory of its own.
    pub data_dir: DataDir,
    /// Whether the daemon needs this plugin: a required plugin whose sidecar
    /// cannot start fails `start()` (and so, in pim-daemon, the daemon's
    /// start). An optional one (the default) is marked failed in
    /// `stats()`, logged once with its last output, retried after
    /// `restart.retry_failed_after`, and `start()` returns `Ok`.
    pub required: bool,
    /// Uids whose processes may call (checked with `SO_PEERCRED`); the
    /// daemon's own effective uid when empty (the default).
    pub allowed_uids: Vec<u32>,
    /// Bounds on connections to the socket.
    pub connections: ConnectionLimits,
    /// Serve the socket from the daemon's socket-server runtime (the
    /// default): one worker thread per CPU (at most 4) shared by all
    /// plugins, apart from the daemon's own runtime so that a busy daemon
    /// loop does not delay a sidecar's calls; `false` serves it on the
    /// daemon's runtime.
    pub server_thread: bool,
    /// Event queue bounds.
    pub queue: QueueLimits,
    /// A budget this plugin's queue shares with other plugins' queues
    /// besides its own bounds (see [`QueueBudget`](crate::QueueBudget)).
    /// Default none; a sidecars file gives all its sidecars one of 256 MiB
    /// (`queue_budget`).
    pub queue_budget: Option<crate::QueueBudget>,
    /// Restarts of a spawned sidecar.
    pub restart: RestartPolicy,
    /// Whether `start` waits until the sidecar registered. Default true for
    /// a spawned sidecar, false for an external one.
    pub wait_for_register: bool,
    /// Bound on that wait. Default 10 s.
    pub startup_timeout: Duration,
    /// Time between the Shutdown event and SIGTERM. Default 5 s.
    pub shutdown_grace: Duration,
    /// Time between SIGTERM and SIGKILL. Default 2 s.
    pub term_grace: Duration,
    /// The user a spawned sidecar runs as (a name or a numeric uid); the
    /// daemon's own when `None`. Needs a daemon running as root. The socket
    /// and the plugin's own data directory then belong to this user, and
    /// `allowed_uids` defaults to its uid.
    pub user: Option<String>,
    /// The group a spawned sidecar runs as (a name or a numeric gid); the
    /// user's primary group (or the gid of the uid's number) by default.
    /// Supplementary groups are always cleared.
    pub group: Option<String>,
    /// The kernel-enforced sandbox of a spawned sidecar: Landlock, seccomp,
    /// resource limits. On by default.
    pub sandbox: Sandbox,
    /// A spawned sidecar that has events pending and acks none of them for
    /// this long is killed and restarted. Default 30 s; `None` disables;
    /// at least [`MIN_STUCK_TIMEOUT`].
    pub stuck_timeout: Option<Duration>,
}

impl SidecarConfig {
    /// A sidecar that the bridge spawns with `command`.
    pub fn spawn(
        name: impl Into<String>,
        payload_kinds: impl IntoIterator<Item = impl Into<String>>,
        socket_dir: impl Into<PathBuf>,
        command: CommandSpec,
    ) -> Self {
        Self::new(name, payload_kinds, socket_dir, Launch::Spawn(command))
    }

    /// A sidecar that runs on its own and connects to the socket.
    pub fn external(
        name: impl Into<String>,
        payload_kinds: impl IntoIterator<Item = impl Into<String>>,
        socket_dir: impl Into<PathBuf>,
    ) -> Self {
        Self::new(name, payload_kinds, socket_dir, Launch::External)
    }

    fn new(
        name: impl Into<String>,
        payload_kinds: impl IntoIterator<Item = impl Into<String>>,
        socket_dir: impl Into<PathBuf>,
        launch: Launch,
    ) -> Self {
        let wait_for_register = matches!(launch, Launch::Spawn(_));
        Self {
            name: name.into(),
            payload_kinds: payload_kinds.into_iter().map(Into::into).collect(),
            socket_dir: socket_dir.into(),
            launch,
            grants: Grants::default(),
            data_dir: DataDir::Own,
            required: false,
            allowed_uids: Vec::new(),
            connections: ConnectionLimits::default(),
            server_thread: true,
            queue: QueueLimits::default(),
            queue_budget: None,
            restart: RestartPolicy::default(),
            wait_for_register,
            startup_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            term_grace: Duration::from_secs(2),
            stuck_timeout: Some(Duration::from_secs(30)),
            user: None,
            group: None,
            sandbox: Sandbox::default(),
        }
    }

    /// The socket path, `<socket_dir>/<name>.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!("{}.sock", self.name))
    }

    /// Where the host writes the token for an external sidecar,
    /// `<socket_dir>/<name>.token` (mode 0600).
    pub fn token_path(&self) -> PathBuf {
        self.socket_dir.join(format!("{}.token", self.name))
    }

    /// Checks every field; the error names the field and the limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        convert::plugin_name("name", &self.name).map_err(ConfigError::from_field)?;
        if self.payload_kinds.is_empty() {
            return Err(ConfigError::new("payload_kinds", "needs at least one kind"));
        }
        if self.payload_kinds.len() > pim_plugin_proto::limits::MAX_KINDS {
            return Err(ConfigError::new(
                "payload_kinds",
                format!(
                    "at most {} kinds, got {}",
                    pim_plugin_proto::limits::MAX_KINDS,
                    self.payload_kinds.len()
                ),
            ));
        }
        for (i, kind) in self.payload_kinds.iter().enumerate() {
            let field = format!("payload_kinds[{i}]");
            convert::payload_kind(&field, kind).map_err(ConfigError::from_field)?;
            if self.payload_kinds[..i].contains(kind) {
                return Err(ConfigError::new(field, format!("`{kind}` is listed twice")));
            }
        }
        if self.required && !self.wait_for_register {
            return Err(ConfigError::new(
                "required",
                "needs wait_for_register = true: start() can only fail for a sidecar it waits for",
            ));
        }
        if matches!(&self.data_dir, DataDir::Path(p) if p.as_os_str().is_empty()) {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        if self.socket_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("socket_dir", "must not be empty"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        let len = self.socket_path().as_os_str().len();
        if len > 107 {
            return Err(ConfigError::new(
                "socket_dir",
                format!("the socket path is at most 107 bytes (a Unix socket limit), got {len}"),
            ));
        }
        if let Launch::Spawn(cmd) = &self.launch {
            if cmd.program.as_os_str().is_empty() {
                return Err(ConfigError::new("command.program", "must not be empty"));
            }
        }
        for (field, value) in [("user", &self.user), ("group", &self.group)] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::new(field, "must not be empty"));
            }
            if value.is_some() && matches!(self.launch, Launch::External) {
                return Err(ConfigError::new(
                    field,
                    "applies to a spawned sidecar only: an external one runs as whoever started it (add its uid to allowed_uids)",
                ));
            }
        }
        if let Some(n) = self.sandbox.limits.open_files {
            if n < 16 {
                return Err(ConfigError::new(
                    "sandbox.limits.open_files",
                    format!("at least 16 (a runtime needs a few), got {n}"),
                ));
            }
        }
        if let Some(n) = self.sandbox.limits.processes {
            if n == 0 {
                return Err(ConfigError::new(
                    "sandbox.limits.processes",
                    "must be at least 1",
                ));
            }
        }
        if let Some(n) = self.sandbox.limits.memory {
            if n < 4 * 1024 * 1024 {
                return Err(ConfigError::new(
                    "sandbox.limits.memory",
                    format!("at least 4 MiB, got {n} bytes"),
                ));
            }
        }
        if self
            .sandbox
            .limits
            .cpu_time
            .is_some_and(|t| t.as_secs() == 0)
        {
            return Err(ConfigError::new("sandbox.limits.cpu_time", "at least 1 s"));
        }
        if self.connections.max_connections == 0 {
            return Err(ConfigError::new(
                "connections.max_connections",
                "must be at least 1",
            ));
        }
        if self.connections.max_streams_per_connection == 0 {
            return Err(ConfigError::new(
                "connections.max_streams_per_connection",
                "must be at least 1",
            ));
        }
        for (field, value) in [
            (
                "connections.keepalive_interval",
                self.connections.keepalive_interval,
            ),
            (
                "connections.keepalive_timeout",
                self.connections.keepalive_timeout,
            ),
            (
                "connections.request_timeout",
                self.connections.request_timeout,
            ),
            ("startup_timeout", self.startup_timeout),
            ("restart.window", self.restart.window),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be more than 0"));
            }
        }
        if self.stuck_timeout.is_some_and(|t| t < MIN_STUCK_TIMEOUT) {
            return Err(ConfigError::new(
                "stuck_timeout",
                format!(
                    "must be at least {} ms (or off): a healthy sidecar at light load may ack 100 ms after its previous Ack",
                    MIN_STUCK_TIMEOUT.as_millis()
                ),
            ));
        }
        if self.restart.max_backoff < self.restart.initial_backoff {
            return Err(ConfigError::new(
                "restart.max_backoff",
                "must be at least restart.initial_backoff",
            ));
        }
        if self.connections.admission_timeout.is_zero() {
            return Err(ConfigError::new(
                "connections.admission_timeout",
                "must be more than 0",
            ));
        }
        if self.queue.max_events == 0 {
            return Err(ConfigError::new("queue.max_events", "must be at least 1"));
        }
        let min_bytes = MAX_BODY_BYTES + crate::queue::EVENT_OVERHEAD_BYTES + 255;
        if self.queue.max_bytes < min_bytes {
            return Err(ConfigError::new(
                "queue.max_bytes",
                format!("must hold one largest payload, at least {min_bytes}"),
            ));
        }
        let durations = [
            (
                "connections.admission_timeout",
                Some(self.connections.admission_timeout),
            ),
            (
                "connections.keepalive_interval",
                Some(self.connections.keepalive_interval),
            ),
            (
                "connections.keepalive_timeout",
                Some(self.connections.keepalive_timeout),
            ),
            (
                "connections.request_timeout",
                Some(self.connections.request_timeout),
            ),
            ("startup_timeout", Some(self.startup_timeout)),
            ("shutdown_grace", Some(self.shutdown_grace)),
            ("term_grace", Some(self.term_grace)),
            ("stuck_timeout", self.stuck_timeout),
            ("restart.window", Some(self.restart.window)),
            (
                "restart.initial_backoff",
                Some(self.restart.initial_backoff),
            ),
            ("restart.max_backoff", Some(self.restart.max_backoff)),
            (
                "restart.retry_failed_after",
                self.restart.retry_failed_after,
            ),
            ("sandbox.limits.cpu_time", self.sandbox.limits.cpu_time),
        ];
        for (field, value) in durations {
            if value.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::new(
                    field,
                    format!("at most 100 years, got {:?}", value.unwrap_or_default()),
                ));
            }
        }
        Ok(())
    }
}

/// The longest duration any setting accepts: 100 years (a longer one would
/// overflow the clock arithmetic of the timers it sets).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Shortest `stuck_timeout` accepted: the Rust SDK, at light load, acks up
/// to 100 ms after its previous Ack, so a shorter timeout would restart
/// healthy sidecars.
pub const MIN_STUCK_TIMEOUT: Duration = Duration::from_millis(250);

/// A configuration field that is out of bounds: the protocol crate's
/// [`InvalidField`] (the one field-error type of the workspace), said of a
/// sidecar's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(InvalidField);

impl ConfigError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self(InvalidField::new(field, problem))
    }

    fn from_field(err: InvalidField) -> Self {
        Self(err)
    }

    /// The offending field.
    pub fn field(&self) -> &str {
        self.0.field()
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        self.0.problem()
    }
}

impl From<InvalidField> for ConfigError {
    fn from(err: InvalidField) -> Self {
        Self(err)
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid sidecar config field `{}`: {}",
            self.field(),
            self.problem()
        )
    }
}

/// No `source`: the field and the problem are the whole story, and a
/// source would print them twice in an error chain.
impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SidecarConfig {
        SidecarConfig::external("echo", ["echo.ping"], "/tmp/pim")
    }

    #[test]
    fn defaults_validate() {
        config().validate().unwrap();
        assert!(!config().wait_for_register);
        let spawned = SidecarConfig::spawn("echo", ["echo.ping"], "/tmp", CommandSpec::new("x"));
        assert!(spawned.wait_for_register);
        assert_eq!(
            spawned.socket_path(),
            std::path::Path::new("/tmp/echo.sock")
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = config();
        c.name = "a/b".into();
        assert_eq!(c.validate().unwrap_err().field(), "name");
        let mut c = config();
        c.payload_kinds = vec!["echo.ping".into(), String::new()];
        assert_eq!(c.validate().unwrap_err().field(), "payload_kinds[1]");
        let mut c = config();
        c.payload_kinds.push("echo.ping".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listed twice"));
        let mut c = config();
        c.payload_kinds.clear();
        assert_eq!(c.validate().unwrap_err().field(), "payload_kinds");
        let mut c = config();
        c.socket_dir = PathBuf::from("/".repeat(120));
        assert!(c.validate().unwrap_err().to_string().contains("107 bytes"));
        let mut c = config();
        c.queue.max_bytes = 1000;
        assert_eq!(c.validate().unwrap_err().field(), "queue.max_bytes");
        let mut c = config();
        c.queue.max_events = 0;
        assert_eq!(c.validate().unwrap_err().field(), "queue.max_events");
        let mut c = config();
        c.connections.max_streams_per_connection = 0;
        assert_eq!(
            c.validate().unwrap_err().field(),
            "connections.max_streams_per_connection"
        );
        let mut c = config();
        c.connections.request_timeout = Duration::ZERO;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid sidecar config field `connections.request_timeout`: must be more than 0"
        );
        let mut c = config();
        c.stuck_timeout = Some(Duration::ZERO);
        assert_eq!(c.validate().unwrap_err().field(), "stuck_timeout");
        c.stuck_timeout = Some(MIN_STUCK_TIMEOUT - Duration::from_millis(1));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("stuck_timeout") && e.contains("at least 250 ms"),
            "{e}"
        );
        c.stuck_timeout = Some(MIN_STUCK_TIMEOUT);
        c.validate().unwrap();
        let mut c = config();
        c.restart.max_backoff = Duration::from_millis(1);
        assert_eq!(c.validate().unwrap_err().field(), "restart.max_backoff");
        let mut c = config();
        c.required = true;
        assert_eq!(c.validate().unwrap_err().field(), "required");
        c.wait_for_register = true;
        c.validate().unwrap();
    }

    /// A duration near `Duration::MAX` would overflow a timer's clock
    /// arithmetic (a panic in the supervisor or the connection task): every
    /// duration setting is bounded, and the error names it.
    #[test]
    fn absurd_durations_are_refused_by_name() {
        let huge = Duration::MAX / 2;
        type Set = fn(&mut SidecarConfig, Duration);
        let fields: [(&str, Set); 13] = [
            ("connections.admission_timeout", |c, d| {
                c.connections.admission_timeout = d
            }),
            ("connections.keepalive_interval", |c, d| {
                c.connections.keepalive_interval = d
            }),
            ("connections.keepalive_timeout", |c, d| {
                c.connections.keepalive_timeout = d
            }),
            ("connections.request_timeout", |c, d| {
                c.connections.request_timeout = d
            }),
            ("startup_timeout", |c, d| c.startup_timeout = d),
            ("shutdown_grace", |c, d| c.shutdown_grace = d),
            ("term_grace", |c, d| c.term_grace = d),
            ("stuck_timeout", |c, d| c.stuck_timeout = Some(d)),
            ("restart.window", |c, d| c.restart.window = d),
            ("restart.initial_backoff", |c, d| {
                c.restart.initial_backoff = d;
                c.restart.max_backoff = d;
            }),
            ("restart.max_backoff", |c, d| c.restart.max_backoff = d),
            ("restart.retry_failed_after", |c, d| {
                c.restart.retry_failed_after = Some(d)
            }),
            ("sandbox.limits.cpu_time", |c, d| {
                c.sandbox.limits.cpu_time = Some(d)
            }),
        ];
        for (field, set) in fields {
            let mut c = config();
            set(&mut c, huge);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.problem().starts_with("at most 100 years"), "{err}");
            let mut c = config();
            set(&mut c, super::MAX_DURATION);
            c.validate().unwrap();
        }
    }
}
