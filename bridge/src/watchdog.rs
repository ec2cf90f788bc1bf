//! The per-sidecar watchdog: the graceful stop, and no orphans, even when
//! the daemon exits without stopping its plugins or is SIGKILLed.
//!
//! Between fork and exec, the sidecar's process forks once more. That
//! second child, the watchdog, runs no Rust beyond a few raw system calls:
//! it closes every file descriptor but the read end of a pipe whose only
//! write end lives in the daemon, and blocks reading it. The kernel closes
//! the write end when the daemon's process ends, however it ends, and the
//! read returns end of file. The watchdog then keeps the daemon's kill
//! order for the sidecar: `shutdown_grace` for it to finish and exit by
//! itself, SIGTERM, `term_grace`, SIGKILL.
//!
//! The watchdog dies with the sidecar (its parent-death signal is SIGKILL),
//! so while the daemon runs it only waits, and a sidecar that exits or is
//! restarted takes its watchdog along. `ps` shows it as `pim-watchdog`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

/// The pipe whose write end only the daemon holds (close-on-exec, so no
/// sidecar inherits it): created once per process.
fn liveness_pipe() -> std::io::Result<&'static (OwnedFd, OwnedFd)> {
    static PIPE: OnceLock<(OwnedFd, OwnedFd)> = OnceLock::new();
    if let Some(pipe) = PIPE.get() {
        return Ok(pipe);
    }
    let (read, write) = cloexec_pipe()?;
    Ok(PIPE.get_or_init(|| (read, write)))
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two file descriptors into the array it is given,
    // which has room for exactly two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10^9: fits every c_long.
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// What the watchdog needs, handed over on the sidecar's stack.
#[repr(C)]
struct WatchArgs {
    sidecar: libc::pid_t,
    read_fd: libc::c_int,
    grace: libc::timespec,
    term: libc::timespec,
}

/// The watchdog's stack. It runs in the sidecar's copy of the daemon's
/// memory (`CLONE_VM`), which the sidecar leaves to it at exec: every
/// watchdog has its own copy of this buffer, and nothing else uses it.
const STACK_BYTES: usize = 64 * 1024;
static mut WATCHDOG_STACK: [u8; STACK_BYTES] = [0; STACK_BYTES];

/// Arranges for `command`'s process to get a watchdog that applies
/// `shutdown_grace` and `term_grace` once the daemon's process is gone.
pub(crate) fn arm(
    command: &mut tokio::process::Command,
    shutdown_grace: Duration,
    term_grace: Duration,
) -> std::io::Result<()> {
    let read_fd = liveness_pipe()?.0.as_raw_fd();
    let grace = timespec(shutdown_grace);
    let term = timespec(term_grace);
    // SAFETY: the closure runs in the forked child before exec. It and the
    // watchdog it starts call only raw system calls through libc (getpid,
    // pipe2, clone, close, read, prctl, getppid, signal, close_range,
    // clock_gettime, clock_nanosleep, kill, _exit) on descriptors and
    // buffers of their own: no allocation, no lock, nothing that another
    // thread of the daemon could have held at fork time. The watchdog
    // shares this child's memory until the exec (`CLONE_VM`, which spares
    // copying the daemon's page tables a second time): it runs on its own
    // stack, copies its arguments before it lets the child go on (`sync`),
    // writes no memory the child uses except, on a failed system call,
    // `errno`, which the child reads only after its own failed `read`
    // (where a wrong value costs one more or one fewer retry). It never
    // returns into Rust code: it ends in `_exit`.
    unsafe {
        command.pre_exec(move || {
            let mut args = WatchArgs {
                sidecar: libc::getpid(),
                read_fd,
                grace,
                term,
            };
            // The daemon learns that the exec succeeded when every copy of
            // a close-on-exec pipe is closed, the watchdog's included: the
            // child waits (on `sync`) until the watchdog has let go of the
            // daemon's descriptors, so the daemon never waits for the
            // watchdog to be scheduled, and `args` outlives its reading.
            let mut sync = [0 as libc::c_int; 2];
            if libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stack = (&raw mut WATCHDOG_STACK).cast::<u8>().add(STACK_BYTES);
            let stack = stack.sub(stack as usize % 16);
            let pid = libc::clone(
                watchdog_main,
                stack.cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                (&raw mut args).cast(),
            );
            let clone_error = std::io::Error::last_os_error();
            libc::close(sync[1]);
            if pid > 0 {
                let mut byte = 0u8;
                while libc::read(sync[0], (&raw mut byte).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
            }
            libc::close(sync[0]);
            if pid < 0 {
                return Err(clone_error);
            }
            Ok(())
        });
    }
    Ok(())
}

/// The watchdog's entry point, on its own stack.
extern "C" fn watchdog_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `WatchArgs` on the child's stack, which
    // stays put until this watchdog closed its copy of `sync` (in `watch`,
    // after this read).
    let args = unsafe { std::ptr::read(arg.cast::<WatchArgs>()) };
    // SAFETY: see `arm`.
    unsafe { watch(args.sidecar, args.read_fd, args.grace, args.term) }
}

/// The watchdog's whole life. Runs in a forked child: raw system calls only.
unsafe fn watch(
    sidecar: libc::pid_t,
    read_fd: libc::c_int,
    grace: libc::timespec,
    term: libc::timespec,
) -> ! {
    // SAFETY (whole body): each call below is a plain system call with
    // arguments that are valid by construction; see `arm`.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != sidecar {
            // The sidecar's process ended before the death signal was armed.
            libc::_exit(0);
        }
        libc::prctl(libc::PR_SET_NAME, c"pim-watchdog".as_ptr());
        // A SIGTERM meant for the sidecar's process group must not end it.
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        // Hold nothing of the daemon's: no sockets, no pipes, no TUN; above
        // all not the pipe that tells the daemon the exec succeeded.
        if read_fd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (read_fd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (read_fd + 1) as u32, u32::MAX, 0u32);
        let mut byte = 0u8;
        loop {
            let n = libc::read(read_fd, (&raw mut byte).cast(), 1);
            if n == 0 {
                break; // the daemon is gone
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n < 0 {
                libc::_exit(1);
            }
        }
        sleep(grace);
        libc::kill(sidecar, libc::SIGTERM);
        sleep(term);
        libc::kill(sidecar, libc::SIGKILL);
        libc::_exit(0)
    }
}

/// Sleeps for `d`, resuming after signals.
unsafe fn sleep(d: libc::timespec) {
    let mut deadline = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers point to live timespecs on this stack.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut deadline);
        deadline.tv_sec = deadline.tv_sec.saturating_add(d.tv_sec);
        deadline.tv_nsec += d.tv_nsec;
        if deadline.tv_nsec >= 1_000_000_000 {
            deadline.tv_nsec -= 1_000_000_000;
            deadline.tv_sec = deadline.tv_sec.saturating_add(1);
        }
        while libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &deadline,
            std::ptr::null_mut(),
        ) == libc::EINTR
        {}
    }
}
