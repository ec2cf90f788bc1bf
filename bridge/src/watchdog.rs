//! The per-sidecar watchdog: the graceful stop, and no orphans, even when
//! the daemon exits without stopping its plugins or is SIGKILLed.
//!
//! Between clone and exec, the sidecar's process starts one more process,
//! the watchdog, before the sandbox applies, and waits until it has exec'd
//! (`CLONE_VFORK`) a three-line
//! `/bin/sh` script: so the watchdog holds none of the daemon's memory (no
//! secrets, no copy-on-write pages) and none of its descriptors but the
//! read end of a pipe whose only write end lives in the daemon. It blocks
//! reading that pipe. The kernel closes the write end when the daemon's
//! process ends, however it ends, and the read returns end of file. The
//! watchdog then keeps the daemon's kill order for the sidecar: wait
//! `shutdown_grace` for it to finish and exit by itself, SIGTERM, wait
//! `term_grace`, SIGKILL.
//!
//! The watchdog dies with the sidecar (its parent-death signal is SIGKILL),
//! so while the daemon runs it only waits, and a sidecar that exits or is
//! restarted takes its watchdog along. In `ps` it is `/bin/sh -c … pim-watchdog`.
//! Without `/bin/sh` and `sleep` the sidecar gets the parent-death signal
//! SIGKILL instead: no orphans, but no grace once the daemon is gone.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

/// The watchdog's script: `$1` and `$2` are the two graces in seconds, fd 3
/// the read end of the daemon's pipe, `$PPID` the sidecar.
const SCRIPT: &CStr = c"read x <&3; sleep \"$1\"; kill -TERM \"$PPID\" 2>/dev/null || exit 0; sleep \"$2\"; kill -KILL \"$PPID\" 2>/dev/null";
const SHELL: &CStr = c"/bin/sh";
const ENV_PATH: &CStr = c"PATH=/usr/bin:/bin";
/// `CAP_KILL` (linux/capability.h).
const CAP_KILL: libc::c_int = 5;

/// The pipe whose write end only the daemon holds (close-on-exec, so no
/// sidecar inherits it): created once per process, both ends above the
/// standard descriptors.
fn liveness_pipe() -> std::io::Result<&'static (OwnedFd, OwnedFd)> {
    static PIPE: OnceLock<(OwnedFd, OwnedFd)> = OnceLock::new();
    if let Some(pipe) = PIPE.get() {
        return Ok(pipe);
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two file descriptors into the array it is given,
    // which has room for exactly two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let pipe = (above_stdio(read)?, above_stdio(write)?);
    Ok(PIPE.get_or_init(|| pipe))
}

/// `fd`, moved to a number above 2 if it is one of the standard three (a
/// daemon that closed its stdin would otherwise get the pipe there, and the
/// sidecar's stdio set-up would replace it).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one or -1.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl succeeded: `moved` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// Whether this machine has what the watchdog runs: `/bin/sh` and `sleep`.
fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let here = std::path::Path::new("/bin/sh").exists()
            && ["/usr/bin/sleep", "/bin/sleep"]
                .iter()
                .any(|p| std::path::Path::new(p).exists());
        if !here {
            tracing::warn!("no /bin/sh or sleep: sidecars get SIGKILL at once when the daemon's process ends, without their grace");
        }
        here
    })
}

/// Seconds with millisecond precision, as `sleep` takes them.
fn seconds(d: Duration) -> CString {
    let text = format!("{}.{:03}", d.as_secs(), d.subsec_millis());
    CString::new(text).unwrap_or_default()
}

/// What the watchdog needs, prepared in the daemon and handed to the
/// sidecar's child process, which starts the watchdog before its exec.
#[derive(Debug)]
pub(crate) struct Watchdog {
    read_fd: libc::c_int,
    // Kept alive for the pointers in `argv`.
    _grace: CString,
    _term: CString,
    argv: [*const libc::c_char; 7],
    envp: [*const libc::c_char; 2],
    stack: crate::sandbox::spawn::Stack,
}

// SAFETY: the pointers point into the strings owned alongside them and into
// static strings; nothing in `Watchdog` is tied to the thread that made it.
unsafe impl Send for Watchdog {}

/// The stack the watchdog runs on until its exec.
const STACK_BYTES: usize = 16 * 1024;

/// Prepares a watchdog that applies `shutdown_grace` and `term_grace` once
/// the daemon's process is gone; `None` where `/bin/sh` or `sleep` is
/// missing (the child then asks for the parent-death signal instead).
pub(crate) fn prepare(
    shutdown_grace: Duration,
    term_grace: Duration,
) -> std::io::Result<Option<Watchdog>> {
    if !available() {
        return Ok(None);
    }
    let read_fd = liveness_pipe()?.0.as_raw_fd();
    let (grace, term) = (seconds(shutdown_grace), seconds(term_grace));
    Ok(Some(Watchdog {
        read_fd,
        argv: [
            SHELL.as_ptr(),
            c"-c".as_ptr(),
            SCRIPT.as_ptr(),
            c"pim-watchdog".as_ptr(),
            grace.as_ptr(),
            term.as_ptr(),
            std::ptr::null(),
        ],
        envp: [ENV_PATH.as_ptr(), std::ptr::null()],
        _grace: grace,
        _term: term,
        stack: crate::sandbox::spawn::Stack::new(STACK_BYTES)?,
    }))
}

/// Starts the watchdog from the sidecar's child process before its exec.
///
/// # Safety
///
/// Only in the child between clone and exec, with every signal blocked:
/// the watchdog borrows `w` (in memory the child shares with the daemon)
/// and runs on `w.stack` until its own exec, while the child waits
/// (`CLONE_VFORK`). Allocation-free: raw system calls only.
pub(crate) unsafe fn start_in_child(
    w: &Watchdog,
    sidecar: libc::pid_t,
    privileged: Option<u32>,
) -> Result<(), i32> {
    let args = WatchArgs {
        sidecar,
        read_fd: w.read_fd,
        argv: w.argv.as_ptr(),
        envp: w.envp.as_ptr(),
        last_cap: privileged.map_or(-1, |c| c as libc::c_int),
    };
    // SAFETY: the stack is the watchdog's own mapping, aligned at its top;
    // `args` outlives the watchdog's use of it (the call returns only after
    // the watchdog exec'd or exited).
    unsafe {
        let top = w.stack.top();
        let pid = libc::clone(
            watchdog_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw const args).cast_mut().cast(),
        );
        if pid < 0 {
            return Err(*libc::__errno_location());
        }
    }
    Ok(())
}

/// What `watchdog_main` reads, on the child's stack.
#[repr(C)]
struct WatchArgs {
    sidecar: libc::pid_t,
    read_fd: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The highest capability number, when the daemon may drop
    /// capabilities (it is root); -1 otherwise.
    last_cap: libc::c_int,
}

/// The watchdog until its exec, on its own stack, in memory shared with
/// the suspended sidecar child: raw system calls only.
extern "C" fn watchdog_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `WatchArgs` on the suspended child's
    // stack, valid until this process execs or exits; every call below is
    // a plain system call with arguments valid by construction.
    unsafe {
        let args = &*arg.cast::<WatchArgs>();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != args.sidecar {
            libc::_exit(0);
        }
        // Of root's powers it keeps one, to signal a sidecar of another
        // uid: CAP_KILL is all that /bin/sh gets at exec.
        if args.last_cap >= 0 {
            for cap in 0..=args.last_cap {
                if cap != CAP_KILL {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong);
                }
            }
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        // Out of the daemon's session and process group; signals a
        // terminal or a service manager sends to that group must not end
        // the watchdog either. The rest take their default action: none
        // runs a handler of the daemon's.
        libc::setsid();
        for signal in 1..=libc::SIGRTMAX() {
            let disposition = match signal {
                libc::SIGKILL | libc::SIGSTOP => continue,
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT => libc::SIG_IGN,
                _ => libc::SIG_DFL,
            };
            libc::signal(signal, disposition);
        }
        // fd 3 is the daemon's pipe; 0 to 2 are closed (the script writes
        // nothing), everything else is closed here or at exec.
        if args.read_fd == 3 {
            libc::fcntl(3, libc::F_SETFD, 0);
        } else {
            libc::dup2(args.read_fd, 3);
        }
        for fd in 0..3 {
            libc::close(fd);
        }
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let unblocked: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_SETMASK, &unblocked, std::ptr::null_mut());
        libc::execve(SHELL.as_ptr(), args.argv, args.envp);
        libc::_exit(127)
    }
}
