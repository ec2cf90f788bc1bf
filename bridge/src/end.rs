//! Why a sidecar process ended, typed, for `stats()` and the log.

use std::process::ExitStatus;
use std::time::Duration;

use pim_plugin_proto::EXIT_REFUSED;

/// Why the last sidecar process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// It exited by itself with this code (0 included).
    Exited {
        /// The exit code.
        code: i32,
    },
    /// It exited with 78: the host refused its Register (wrong name,
    /// kinds, version or token); it is not restarted.
    Refused,
    /// A signal ended it that none of the reasons below explains.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// The kernel killed it for going over the memory limit of its cgroup.
    OutOfMemory {
        /// The limit, in bytes.
        limit_bytes: Option<u64>,
    },
    /// It used up its CPU time (`limits.cpu_time`): SIGXCPU.
    CpuTimeLimit,
    /// The supervisor killed it: events were pending and none was acked for
    /// `stuck_timeout`.
    Stuck {
        /// The first unacked seq.
        seq: u64,
    },
    /// The daemon stopped the plugin (Shutdown event, and if need be
    /// SIGTERM and SIGKILL).
    Stopped,
    /// [`crate::SidecarPlugin::restart`] replaced it.
    Replaced,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited { code } => write!(f, "exited with status {code}"),
            Self::Refused => write!(
                f,
                "exited with status {EXIT_REFUSED}: its Register was refused"
            ),
            Self::Signaled { signal } => {
                write!(f, "killed by signal {signal} ({})", signal_name(*signal))
            }
            Self::OutOfMemory {
                limit_bytes: Some(b),
            } => {
                write!(
                    f,
                    "killed by the kernel: out of memory (limit {} MiB)",
                    b / (1024 * 1024)
                )
            }
            Self::OutOfMemory { limit_bytes: None } => {
                write!(f, "killed by the kernel: out of memory")
            }
            Self::CpuTimeLimit => write!(f, "killed for exceeding its CPU time limit (SIGXCPU)"),
            Self::Stuck { seq } => write!(f, "killed by the supervisor: stuck on seq {seq}"),
            Self::Stopped => write!(f, "stopped by the daemon"),
            Self::Replaced => write!(f, "replaced on request"),
        }
    }
}

/// One ended sidecar process.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessEnd {
    /// Why it ended.
    pub reason: EndReason,
    /// Its pid.
    pub pid: u32,
    /// How long it ran.
    pub ran_for: Duration,
    /// The exit status as the kernel gave it (`exit status 1`, `killed by
    /// signal 9`).
    pub status: String,
    /// Its last lines of output (stdout and stderr, at most 20).
    pub last_output: Vec<String>,
}

/// The reason for a process that ended by itself (not stopped, replaced or
/// killed as stuck), given whether its cgroup saw an OOM kill meanwhile.
pub(crate) fn classify(
    status: &std::io::Result<ExitStatus>,
    oom_killed: bool,
    memory_limit: Option<u64>,
) -> EndReason {
    use std::os::unix::process::ExitStatusExt;
    let Ok(status) = status else {
        return EndReason::Signaled { signal: 0 };
    };
    match (status.code(), status.signal()) {
        (Some(code), _) if code == i32::from(EXIT_REFUSED) => EndReason::Refused,
        (Some(code), _) => EndReason::Exited { code },
        (None, Some(libc::SIGKILL)) if oom_killed => EndReason::OutOfMemory {
            limit_bytes: memory_limit,
        },
        (None, Some(libc::SIGXCPU)) => EndReason::CpuTimeLimit,
        (None, Some(signal)) => EndReason::Signaled { signal },
        _ => EndReason::Signaled { signal: 0 },
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses_are_classified() {
        let exit = |code: i32| Ok(ExitStatus::from_raw(code << 8));
        let signal = |sig: i32| Ok(ExitStatus::from_raw(sig));
        assert_eq!(
            classify(&exit(0), false, None),
            EndReason::Exited { code: 0 }
        );
        assert_eq!(classify(&exit(78), false, None), EndReason::Refused);
        assert_eq!(
            classify(&signal(libc::SIGKILL), true, Some(1 << 20)),
            EndReason::OutOfMemory {
                limit_bytes: Some(1 << 20)
            }
        );
        assert_eq!(
            classify(&signal(libc::SIGKILL), false, None),
            EndReason::Signaled {
                signal: libc::SIGKILL
            }
        );
        assert_eq!(
            classify(&signal(libc::SIGXCPU), false, None),
            EndReason::CpuTimeLimit
        );
        assert!(EndReason::OutOfMemory {
            limit_bytes: Some(64 << 20)
        }
        .to_string()
        .contains("out of memory (limit 64 MiB)"));
    }
}
