//! The kernel-enforced sandbox of a spawned sidecar, and the spawn itself.
//!
//! What a sidecar may do is decided in the daemon, before the process
//! exists: its uid and gid, a Landlock ruleset (the files it may read and
//! write), a seccomp filter (the system calls it may not make), resource
//! limits and a cgroup. The child between clone and exec only applies what
//! was prepared, with raw system calls ([`spawn`]).

mod cgroup;
mod identity;
mod landlock;
mod seccomp;
pub(crate) mod spawn;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use cgroup::Cgroup;
pub(crate) use identity::{check_reachable, resolve as resolve_identity, Identity};
pub(crate) use spawn::Process;

/// The sandbox of a spawned sidecar: on by default wherever the daemon can
/// apply it, each mechanism with an opt-out of its own. The uid and gid are
/// [`crate::SidecarConfig::user`] and [`crate::SidecarConfig::group`].
///
/// Whatever the settings, a spawned sidecar runs with `no_new_privs` set
/// and no capabilities (ambient, inheritable, permitted and effective sets
/// empty; the bounding set too under a root daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sandbox {
    /// Confine the file system with Landlock (default true): the sidecar
    /// may read and execute only the system's programs and libraries, its
    /// own program and interpreter, and `read_paths`; write only its data
    /// directory and `write_paths`; on Linux 6.12 or later (Landlock ABI 6)
    /// signal and connect to abstract sockets only within its own sandbox.
    pub landlock: bool,
    /// More paths (files or directories, taken with everything beneath)
    /// the sidecar may read and execute.
    pub read_paths: Vec<PathBuf>,
    /// More paths the sidecar may read, write, create and remove in.
    pub write_paths: Vec<PathBuf>,
    /// Refuse the system calls of [`default_denied_syscalls`] with `EPERM`
    /// (default true).
    pub seccomp: bool,
    /// Names taken out of the deny-list (for example `ptrace` for a plugin
    /// that debugs its own children).
    pub allow_syscalls: Vec<String>,
    /// Names added to the deny-list.
    pub deny_syscalls: Vec<String>,
    /// Memory, processes, open files, CPU time.
    pub limits: ResourceLimits,
    /// Also pass the token in `PIM_PLUGIN_TOKEN` (default false), for a
    /// client that cannot read it from the inherited descriptor named by
    /// `PIM_PLUGIN_TOKEN_FD`. A process of the same uid can read a
    /// process's original environment in `/proc/<pid>/environ`, so only
    /// for a sidecar with a uid of its own.
    pub token_env: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self {
            landlock: true,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            seccomp: true,
            allow_syscalls: Vec::new(),
            deny_syscalls: Vec::new(),
            limits: ResourceLimits::default(),
            token_env: false,
        }
    }
}

impl Sandbox {
    /// No Landlock, no seccomp filter, no resource limits: only
    /// `no_new_privs` and the dropped capabilities remain (and the uid, if
    /// one is configured).
    pub fn off() -> Self {
        Self {
            landlock: false,
            seccomp: false,
            limits: ResourceLimits::none(),
            ..Self::default()
        }
    }
}

/// Per-sidecar resource limits; `None` leaves one unlimited.
///
/// Memory and processes are enforced by a cgroup of the sidecar's own where
/// the machine offers cgroup v1 `memory` and `pids` controllers to the
/// daemon (a sidecar that exceeds its memory is killed by the kernel and
/// reported as out of memory); elsewhere by `RLIMIT_DATA` and, for a
/// sidecar with a uid of its own, `RLIMIT_NPROC`. Open files and CPU time
/// are rlimits everywhere. Core dumps are always off (`RLIMIT_CORE` 0): a
/// core holds the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceLimits {
    /// Bytes of memory. Default 512 MiB.
    pub memory: Option<u64>,
    /// Processes and threads together. Default 256.
    pub processes: Option<u64>,
    /// Open file descriptors. Default 1024.
    pub open_files: Option<u64>,
    /// CPU time over the process's life; past it the kernel sends SIGXCPU
    /// and the supervisor restarts the sidecar. Default unlimited.
    pub cpu_time: Option<Duration>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            memory: Some(512 * 1024 * 1024),
            processes: Some(256),
            open_files: Some(1024),
            cpu_time: None,
        }
    }
}

impl ResourceLimits {
    /// Every limit off.
    pub fn none() -> Self {
        Self {
            memory: None,
            processes: None,
            open_files: None,
            cpu_time: None,
        }
    }
}

/// The system calls a sidecar may not make by default: debugging and
/// reading other processes, mounting and namespaces, kernel modules and
/// kexec, BPF and perf, the kernel keyring, io_uring (which bypasses this
/// filter), clock and host settings. `clone` with a namespace flag is
/// refused too, and `clone3` answers `ENOSYS` so that C libraries fall
/// back to `clone`, whose flags the filter can see.
pub fn default_denied_syscalls() -> &'static [&'static str] {
    seccomp::DEFAULT_DENIED
}

/// How one mechanism of the sandbox stands for the running sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enforcement {
    /// Applied by the kernel.
    Enforced,
    /// Turned off in the configuration.
    Off,
    /// Configured but not available here; the text says why.
    Unavailable(String),
}

/// What the kernel enforces on the last sidecar process spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SandboxReport {
    /// The uid it runs as.
    pub uid: u32,
    /// The gid it runs as (no supplementary groups).
    pub gid: u32,
    /// Landlock file-system confinement (with the ABI version in use).
    pub landlock: Enforcement,
    /// The Landlock ABI version of this kernel, 0 without Landlock.
    pub landlock_abi: u32,
    /// The seccomp deny-list.
    pub seccomp: Enforcement,
    /// The memory and process limits of its cgroup (elsewhere: rlimits).
    pub cgroup: Enforcement,
    /// The cgroup's directories (`memory`, `pids`), where it has one.
    pub cgroup_paths: Vec<PathBuf>,
}

/// What every spawn of one plugin shares: its identity, its seccomp
/// filters, its cgroup and the resulting report. Built when the plugin
/// starts serving; the Landlock ruleset is built anew for every spawn (a
/// rule holds the inode of a file, and an upgraded program is a new one).
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) identity: Identity,
    /// The program as configured; found anew at every spawn.
    program: PathBuf,
    landlock: bool,
    read_paths: Vec<PathBuf>,
    write_paths: Vec<PathBuf>,
    pub(crate) seccomp: Vec<seccompiler::BpfProgram>,
    pub(crate) cgroup: Option<std::sync::Mutex<Cgroup>>,
    pub(crate) rlimits: Vec<(u32, u64, u64)>,
    pub(crate) token_env: bool,
    pub(crate) report: SandboxReport,
    /// The last ruleset built, with the files it was built for.
    ruleset: std::sync::Mutex<Option<(RulesetKey, std::sync::Arc<std::os::fd::OwnedFd>)>>,
}

/// The files a ruleset was built for: each path with its device, inode and
/// change time.
type RulesetKey = Vec<(PathBuf, Option<(u64, u64, i64)>)>;

/// Device, inode and change time of `path`, if it exists.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime()))
}

impl Plan {
    /// Checks and prepares the sandbox of plugin `name`; the error names
    /// the setting and says what to change.
    pub(crate) fn new(
        name: &str,
        program: &std::path::Path,
        identity: Identity,
        sandbox: &Sandbox,
        data_dir: &std::path::Path,
    ) -> Result<Self, String> {
        if identity.switch {
            identity::check_reachable(data_dir, identity.uid, identity.gid)
                .map_err(|e| format!("data_dir: {e}"))?;
        }
        for (field, paths) in [
            ("read_paths", &sandbox.read_paths),
            ("write_paths", &sandbox.write_paths),
        ] {
            for (i, path) in paths.iter().enumerate() {
                if !path.is_absolute() || !path.exists() {
                    return Err(format!(
                        "sandbox.{field}[{i}]: {} must be an absolute path that exists",
                        path.display()
                    ));
                }
            }
        }
        if identity.uid == 0 {
            // Without capabilities, but still the owner of root's files and
            // admitted by root-only Unix sockets (a service manager's, a
            // container engine's) that check the peer's uid alone.
            tracing::warn!(
                plugin = name,
                "sidecar runs as uid 0 (without capabilities): give it a `user` of its own; as uid 0 it can still connect to Unix sockets that trust uid 0"
            );
        }
        let landlock_abi = landlock::kernel_abi();
        let landlock_state = match (sandbox.landlock, landlock_abi) {
            (false, _) => Enforcement::Off,
            (true, 0) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("this kernel has no Landlock: sidecars' file-system access is not confined (stats() says so per plugin)");
                });
                Enforcement::Unavailable("this kernel has no Landlock".into())
            }
            (true, _) => Enforcement::Enforced,
        };
        let (seccomp, seccomp_state) = match sandbox.seccomp {
            false => (Vec::new(), Enforcement::Off),
            true => match seccomp::filters(
                &sandbox.allow_syscalls,
                &sandbox.deny_syscalls,
                identity.uid == 0,
            )? {
                Some(programs) => (programs, Enforcement::Enforced),
                None => (
                    Vec::new(),
                    Enforcement::Unavailable(format!(
                        "no seccomp filter for {}",
                        std::env::consts::ARCH
                    )),
                ),
            },
        };
        let limits = sandbox.limits;
        let (cgroup, cgroup_state) = if limits.memory.is_none() && limits.processes.is_none() {
            (None, Enforcement::Off)
        } else {
            match Cgroup::create(name, limits.memory, limits.processes) {
                Ok(group) => (Some(group), Enforcement::Enforced),
                Err(why) => {
                    tracing::warn!(
                        plugin = name,
                        "no cgroup for the sidecar ({why}): memory and process limits are rlimits"
                    );
                    (None, Enforcement::Unavailable(why))
                }
            }
        };
        let rlimits = rlimits(&limits, cgroup.as_ref(), identity.switch)?;
        let mut write_paths = sandbox.write_paths.clone();
        write_paths.push(data_dir.to_owned());
        let cgroup_paths = cgroup.as_ref().map(Cgroup::paths).unwrap_or_default();
        Ok(Self {
            identity,
            program: program.to_owned(),
            landlock: landlock_state == Enforcement::Enforced,
            read_paths: sandbox.read_paths.clone(),
            write_paths,
            seccomp,
            cgroup: cgroup.map(std::sync::Mutex::new),
            rlimits,
            token_env: sandbox.token_env,
            ruleset: std::sync::Mutex::new(None),
            report: SandboxReport {
                uid: identity.uid,
                gid: identity.gid,
                landlock: landlock_state,
                landlock_abi,
                seccomp: seccomp_state,
                cgroup: cgroup_state,
                cgroup_paths,
            },
        })
    }

    /// Finds the program (see [`spawn::resolve_program`]) and checks that
    /// the sidecar's uid can reach it and its interpreter; returns both.
    pub(crate) fn program(&self) -> std::io::Result<(PathBuf, Option<PathBuf>)> {
        let program = spawn::resolve_program(&self.program)?;
        let interpreter = landlock::script_interpreter(&program);
        if self.identity.switch {
            for path in std::iter::once(&program).chain(&interpreter) {
                identity::check_reachable(path, self.identity.uid, self.identity.gid)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
            }
        }
        Ok((program, interpreter))
    }

    /// The Landlock ruleset (numbered above the standard descriptors) for
    /// `program`, if Landlock is on. A ruleset holds the inodes of its
    /// paths: it is reused while the program, its interpreter and the
    /// writable directories are the same files, and built anew otherwise
    /// (an upgraded program is a new inode).
    pub(crate) fn landlock_ruleset(
        &self,
        program: &std::path::Path,
        interpreter: Option<&std::path::Path>,
    ) -> std::io::Result<Option<std::sync::Arc<std::os::fd::OwnedFd>>> {
        if !self.landlock {
            return Ok(None);
        }
        let key: RulesetKey = std::iter::once(program)
            .chain(interpreter)
            .chain(self.write_paths.iter().map(PathBuf::as_path))
            .chain(self.read_paths.iter().map(PathBuf::as_path))
            .map(|p| (p.to_owned(), file_identity(p)))
            .collect();
        let mut cached = self.ruleset.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, fd)) = cached.as_ref() {
            if *k == key {
                return Ok(Some(fd.clone()));
            }
        }
        let fd = landlock::ruleset(program, interpreter, &self.read_paths, &self.write_paths)
            .map_err(std::io::Error::other)?
            .map(spawn::high)
            .transpose()?
            .map(std::sync::Arc::new);
        if let Some(fd) = &fd {
            *cached = Some((key, fd.clone()));
        }
        Ok(fd)
    }

    /// The files through which a new process joins the cgroup.
    pub(crate) fn cgroup_files(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        match &self.cgroup {
            Some(group) => group.lock().unwrap_or_else(|e| e.into_inner()).join_files(),
            None => Ok(Vec::new()),
        }
    }

    /// OOM kills in the cgroup so far.
    pub(crate) fn oom_kills(&self) -> u64 {
        self.cgroup.as_ref().map_or(0, |g| {
            g.lock().unwrap_or_else(|e| e.into_inner()).oom_kills()
        })
    }

    /// The cgroup's memory limit, if it sets one.
    pub(crate) fn memory_limit(&self) -> Option<u64> {
        self.cgroup
            .as_ref()
            .and_then(|g| g.lock().unwrap_or_else(|e| e.into_inner()).memory_limit())
    }

    /// SIGKILLs every process the last sidecar left in its cgroup.
    pub(crate) fn kill_leftovers(&self) {
        if let Some(group) = &self.cgroup {
            group.lock().unwrap_or_else(|e| e.into_inner()).kill_all();
        }
    }

    /// Removes the cgroup (the plugin stopped).
    pub(crate) fn remove_cgroup(&self) {
        if let Some(group) = &self.cgroup {
            group.lock().unwrap_or_else(|e| e.into_inner()).remove();
        }
    }
}

/// The rlimits: (resource, soft, hard). Core dumps always off.
fn rlimits(
    limits: &ResourceLimits,
    cgroup: Option<&Cgroup>,
    own_uid: bool,
) -> Result<Vec<(u32, u64, u64)>, String> {
    let mut out = vec![(libc::RLIMIT_CORE, 0, 0)];
    let mut add = |field: &str, resource: u32, value: u64, hard: u64| -> Result<(), String> {
        let mut current = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit64 writes one rlimit64.
        unsafe { libc::getrlimit64(resource, &mut current) };
        if hard > current.rlim_max && !has_capability(CAP_SYS_RESOURCE) {
            return Err(format!(
                "sandbox.limits.{field}: {value} is above the daemon's own hard limit {} (raising it needs CAP_SYS_RESOURCE)",
                current.rlim_max
            ));
        }
        out.push((resource, value, hard));
        Ok(())
    };
    if let Some(n) = limits.open_files {
        add("open_files", libc::RLIMIT_NOFILE, n, n)?;
    }
    if let Some(t) = limits.cpu_time {
        let secs = t.as_secs().max(1);
        // SIGXCPU at the soft limit (reported as such), SIGKILL a second later.
        add("cpu_time", libc::RLIMIT_CPU, secs, secs.saturating_add(1))?;
    }
    if let Some(bytes) = limits.memory {
        if !cgroup.is_some_and(Cgroup::limits_memory) {
            add("memory", libc::RLIMIT_DATA, bytes, bytes)?;
        }
    }
    if let Some(n) = limits.processes {
        // RLIMIT_NPROC counts every process of the uid, and never binds
        // root: only for a sidecar with a uid of its own.
        if own_uid && !cgroup.is_some_and(Cgroup::limits_processes) {
            add("processes", libc::RLIMIT_NPROC, n, n)?;
        }
    }
    Ok(out)
}

const CAP_SYS_RESOURCE: u32 = 24;
pub(crate) const CAP_SETPCAP: u32 = 8;

/// Whether this process has `cap` in its effective set (read once: a
/// daemon does not gain capabilities as it runs).
pub(crate) fn has_capability(cap: u32) -> bool {
    static EFFECTIVE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let caps = *EFFECTIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .unwrap_or(0)
    });
    caps & (1 << cap) != 0
}
