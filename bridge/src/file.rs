//! The TOML file in which a daemon declares its sidecars.
//!
//! ```toml
//! socket_dir = "/run/pim/plugins"    # for every sidecar below
//!
//! [[sidecar]]
//! name = "echo"
//! payload_kinds = ["echo.ping", "echo.pong"]
//! command = ["/usr/lib/pim/echo-sidecar", "--greeting", "hi"]  # or: external = true
//! user = "pim-echo"                  # needs a root daemon
//! sandbox = { limits = { memory = "64MiB" } }
//! ```
//!
//! Every setting, with its default, is in the README's "Declaring sidecars
//! in a file" (its tests check that block against this parser: every key,
//! every default).
//!
//! A relative program path with a `/` in it is resolved against the file's
//! directory; a bare name is looked up in the daemon's `PATH`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pim_plugin::DaemonPlugin;
use serde::Deserialize;

use crate::{CommandSpec, ConfigError, Launch, SidecarConfig, SidecarPlugin};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    socket_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "size_or_off")]
    queue_budget: Option<Option<u64>>,
    #[serde(default)]
    sidecar: Vec<SidecarDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SidecarDoc {
    name: String,
    payload_kinds: Vec<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    external: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    inherit_env: Vec<String>,
    current_dir: Option<PathBuf>,
    socket_dir: Option<PathBuf>,
    #[serde(default)]
    grants: Vec<GrantDoc>,
    data_dir: Option<String>,
    required: Option<bool>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    connections: Option<ConnectionsDoc>,
    wait_for_register: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    startup_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    term_grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration_or_off")]
    stuck_timeout: Option<Option<Duration>>,
    queue: Option<QueueDoc>,
    restart: Option<RestartDoc>,
    user: Option<NameOrId>,
    group: Option<NameOrId>,
    sandbox: Option<SandboxDoc>,
}

/// A user or group: a name, or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NameOrId {
    Id(u32),
    Name(String),
}

impl NameOrId {
    fn text(self) -> String {
        match self {
            Self::Id(n) => n.to_string(),
            Self::Name(s) => s,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxDoc {
    landlock: Option<bool>,
    #[serde(default)]
    read_paths: Vec<PathBuf>,
    #[serde(default)]
    write_paths: Vec<PathBuf>,
    seccomp: Option<bool>,
    #[serde(default)]
    allow_syscalls: Vec<String>,
    #[serde(default)]
    deny_syscalls: Vec<String>,
    token_env: Option<bool>,
    limits: Option<LimitsDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    #[serde(default, deserialize_with = "size_or_off")]
    memory: Option<Option<u64>>,
    #[serde(default, deserialize_with = "count_or_off")]
    processes: Option<Option<u64>>,
    #[serde(default, deserialize_with = "count_or_off")]
    open_files: Option<Option<u64>>,
    #[serde(default, deserialize_with = "duration_or_off")]
    cpu_time: Option<Option<Duration>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GrantDoc {
    SigningSeed,
    RawControl,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueDoc {
    max_events: Option<usize>,
    max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsDoc {
    max_connections: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    admission_timeout: Option<Duration>,
    max_streams_per_connection: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    keepalive_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    keepalive_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    request_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartDoc {
    max_restarts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    initial_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    max_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration_or_off")]
    retry_failed_after: Option<Option<Duration>>,
}

/// The longest duration a sidecars file may give, in seconds.
const MAX_DURATION_SECS: u64 = crate::MAX_DURATION.as_secs();

/// Parses `"250ms"`, `"5s"`, `"2m"` or `"1h"`, at most 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("expected a duration like \"500ms\", \"5s\" or \"2m\", got {text:?}")
    })?;
    let secs = |scale: u64| {
        n.checked_mul(scale)
            .filter(|&s| s <= MAX_DURATION_SECS)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                format!("{text:?} is longer than the longest duration accepted, 100 years")
            })
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)).and_then(|d| match d.as_secs() <= MAX_DURATION_SECS {
            true => Ok(d),
            false => Err(format!(
                "{text:?} is longer than the longest duration accepted, 100 years"
            )),
        }),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!(
            "expected a duration like \"500ms\", \"5s\" or \"2m\", got {text:?}"
        )),
    }
}

/// Parses a size: a number of bytes, or `"64KiB"`, `"512MiB"`, `"2GiB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad =
        || format!("expected a size like \"512MiB\", \"2GiB\" or a number of bytes, got {text:?}");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is more than 2^64 bytes"))
}

/// A number, a string of one, or `"off"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn size_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(Some(Some(n))),
        NumberOrText::Text(t) if t.trim() == "off" => Ok(Some(None)),
        NumberOrText::Text(t) => parse_size(&t)
            .map(|n| Some(Some(n)))
            .map_err(serde::de::Error::custom),
    }
}

fn count_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(Some(Some(n))),
        NumberOrText::Text(t) if t.trim() == "off" => Ok(Some(None)),
        NumberOrText::Text(t) => Err(serde::de::Error::custom(format!(
            "expected a number or \"off\", got {t:?}"
        ))),
    }
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn duration_or_off<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Duration>>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim() == "off" {
        return Ok(Some(None));
    }
    parse_duration(&text)
        .map(|d| Some(Some(d)))
        .map_err(serde::de::Error::custom)
}

/// Why a sidecars file could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The file is not valid TOML or has fields of the wrong shape; the
    /// message names the key, line and column.
    Parse(String),
    /// A sidecar's settings are out of bounds; the field path says which.
    Invalid(ConfigError),
}

impl std::fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { path, error } => write!(f, "reading {}: {error}", path.display()),
            Self::Parse(msg) => write!(f, "{msg}"),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConfigFileError {}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Invalid(ConfigError::new(field, problem))
}

/// Parses a sidecars file's text; relative paths are resolved against `base_dir`.
pub fn parse_sidecars(text: &str, base_dir: &Path) -> Result<Vec<SidecarConfig>, ConfigFileError> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| ConfigFileError::Parse(e.to_string()))?;
    let mut configs: Vec<SidecarConfig> = Vec::new();
    // One budget for every sidecar of the file, unless "off".
    let budget = match doc.queue_budget.unwrap_or(Some(DEFAULT_QUEUE_BUDGET)) {
        None => None,
        Some(0) => {
            return Err(invalid(
                "queue_budget",
                "must be at least 1 byte, or \"off\"",
            ))
        }
        Some(n) => Some(crate::QueueBudget::new(usize::try_from(n).map_err(
            |_| invalid("queue_budget", "is more than this machine can address"),
        )?)),
    };
    for (i, sc) in doc.sidecar.into_iter().enumerate() {
        let at = |field: &str| format!("sidecar[{i}].{field}");
        let socket_dir = sc
            .socket_dir
            .or_else(|| doc.socket_dir.clone())
            .ok_or_else(|| {
                invalid(
                    at("socket_dir"),
                    "is required here or at the top of the file",
                )
            })?;
        let socket_dir = base_dir.join(socket_dir);
        let launch = match (sc.external, sc.command.split_first()) {
            (true, None) => Launch::External,
            (true, Some(_)) => {
                return Err(invalid(at("command"), "an external sidecar has no command"))
            }
            (false, None) => {
                return Err(invalid(
                    at("command"),
                    "is required (the program and its arguments), unless `external = true`",
                ))
            }
            (false, Some((program, args))) => {
                let program = if program.contains('/') {
                    base_dir.join(program)
                } else {
                    PathBuf::from(program)
                };
                let mut cmd = CommandSpec::new(program);
                cmd.args = args.iter().map(Into::into).collect();
                cmd.env = sc
                    .env
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect();
                cmd.inherit_env = sc.inherit_env.into_iter().map(Into::into).collect();
                cmd.current_dir = sc.current_dir.map(|d| base_dir.join(d));
                Launch::Spawn(cmd)
            }
        };
        let mut config = match launch {
            Launch::Spawn(cmd) => SidecarConfig::spawn(&sc.name, sc.payload_kinds, socket_dir, cmd),
            Launch::External => SidecarConfig::external(&sc.name, sc.payload_kinds, socket_dir),
        };
        for grant in sc.grants {
            match grant {
                GrantDoc::SigningSeed => config.grants.signing_seed = true,
                GrantDoc::RawControl => config.grants.raw_control = true,
            }
        }
        config.allowed_uids = sc.allowed_uids;
        config.user = sc.user.map(NameOrId::text);
        config.group = sc.group.map(NameOrId::text);
        if let Some(doc) = sc.sandbox {
            let b = &mut config.sandbox;
            b.landlock = doc.landlock.unwrap_or(b.landlock);
            b.seccomp = doc.seccomp.unwrap_or(b.seccomp);
            b.token_env = doc.token_env.unwrap_or(b.token_env);
            b.read_paths = doc.read_paths.iter().map(|p| base_dir.join(p)).collect();
            b.write_paths = doc.write_paths.iter().map(|p| base_dir.join(p)).collect();
            b.allow_syscalls = doc.allow_syscalls;
            b.deny_syscalls = doc.deny_syscalls;
            if let Some(l) = doc.limits {
                let m = &mut b.limits;
                m.memory = l.memory.unwrap_or(m.memory);
                m.processes = l.processes.unwrap_or(m.processes);
                m.open_files = l.open_files.unwrap_or(m.open_files);
                m.cpu_time = l.cpu_time.unwrap_or(m.cpu_time);
            }
        }
        if let Some(dir) = sc.data_dir {
            config.data_dir = match dir.as_str() {
                "own" => crate::DataDir::Own,
                "daemon" => crate::DataDir::Daemon,
                "" => {
                    return Err(invalid(
                        at("data_dir"),
                        "must be \"own\", \"daemon\" or a path",
                    ))
                }
                path => crate::DataDir::Path(base_dir.join(path)),
            };
        }
        if let Some(required) = sc.required {
            config.required = required;
        }
        if let Some(c) = sc.connections {
            let l = &mut config.connections;
            l.max_connections = c.max_connections.unwrap_or(l.max_connections);
            l.admission_timeout = c.admission_timeout.unwrap_or(l.admission_timeout);
            l.max_streams_per_connection = c
                .max_streams_per_connection
                .unwrap_or(l.max_streams_per_connection);
            l.keepalive_interval = c.keepalive_interval.unwrap_or(l.keepalive_interval);
            l.keepalive_timeout = c.keepalive_timeout.unwrap_or(l.keepalive_timeout);
            l.request_timeout = c.request_timeout.unwrap_or(l.request_timeout);
        }
        if let Some(w) = sc.wait_for_register {
            config.wait_for_register = w;
        }
        if let Some(d) = sc.startup_timeout {
            config.startup_timeout = d;
        }
        if let Some(d) = sc.shutdown_grace {
            config.shutdown_grace = d;
        }
        if let Some(d) = sc.term_grace {
            config.term_grace = d;
        }
        if let Some(d) = sc.stuck_timeout {
            config.stuck_timeout = d;
        }
        if let Some(q) = sc.queue {
            config.queue.max_events = q.max_events.unwrap_or(config.queue.max_events);
            config.queue.max_bytes = q.max_bytes.unwrap_or(config.queue.max_bytes);
        }
        if let Some(r) = sc.restart {
            let p = &mut config.restart;
            p.max_restarts = r.max_restarts.unwrap_or(p.max_restarts);
            p.window = r.window.unwrap_or(p.window);
            p.initial_backoff = r.initial_backoff.unwrap_or(p.initial_backoff);
            p.max_backoff = r.max_backoff.unwrap_or(p.max_backoff);
            p.retry_failed_after = r.retry_failed_after.unwrap_or(p.retry_failed_after);
        }
        config
            .validate()
            .map_err(|e| invalid(at(e.field()), e.problem()))?;
        for (j, other) in configs.iter().enumerate() {
            if other.socket_path() == config.socket_path() {
                return Err(invalid(
                    at("name"),
                    format!(
                        "`{}` is also sidecar[{j}] in the same socket_dir",
                        config.name
                    ),
                ));
            }
            if let Some(kind) = config
                .payload_kinds
                .iter()
                .find(|k| other.payload_kinds.contains(k))
            {
                return Err(invalid(
                    at("payload_kinds"),
                    format!(
                        "`{kind}` is already claimed by sidecar[{j}] `{}`",
                        other.name
                    ),
                ));
            }
        }
        config.queue_budget = budget.clone();
        configs.push(config);
    }
    Ok(configs)
}

/// The queue budget a sidecars file's sidecars share unless it sets
/// `queue_budget`: 256 MiB (four plugins' default own bound).
pub const DEFAULT_QUEUE_BUDGET: u64 = 256 << 20;

/// Reads and parses a sidecars file.
pub fn load_sidecars(path: &Path) -> Result<Vec<SidecarConfig>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_sidecars(&text, base).map_err(|e| match e {
        ConfigFileError::Parse(msg) => ConfigFileError::Parse(format!("{}: {msg}", path.display())),
        ConfigFileError::Invalid(err) => ConfigFileError::Invalid(ConfigError::new(
            format!("{}: {}", path.display(), err.field()),
            err.problem(),
        )),
        other => other,
    })
}

/// The daemon's plugins for these sidecars, ready to `start`.
pub fn plugins(configs: Vec<SidecarConfig>) -> Result<Vec<Arc<dyn DaemonPlugin>>, ConfigError> {
    configs
        .into_iter()
        .map(|c| Ok(Arc::new(SidecarPlugin::new(c)?) as Arc<dyn DaemonPlugin>))
        .collect()
}

/// Reads a sidecars file and turns it into the daemon's plugins.
pub fn plugins_from_file(path: &Path) -> Result<Vec<Arc<dyn DaemonPlugin>>, ConfigFileError> {
    plugins(load_sidecars(path)?).map_err(ConfigFileError::Invalid)
}

#[cfg(test)]
mod tests;
