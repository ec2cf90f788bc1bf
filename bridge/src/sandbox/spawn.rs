//! Spawning a sidecar: `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` and an
//! allocation-free child that applies the prepared sandbox and execs.
//!
//! The child shares the daemon's memory until its exec, so nothing is
//! copied: the cost of a spawn does not grow with the daemon's size (a
//! `fork` copies every page table). The thread that clones waits, blocked,
//! until the exec; the daemon's other threads run on. The child may
//! therefore take no lock and allocate nothing, since another thread may
//! hold the allocator's lock: it runs one function on a stack of its own,
//! reads only what [`prepare`] built, and makes raw system calls (not
//! glibc's `setuid` family, which would signal the daemon's threads). A
//! failure is written to memory the daemon reads after the clone returns.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use seccompiler::BpfProgram;
use tokio::io::unix::AsyncFd;

use super::identity::Identity;
use super::{cgroup, seccomp};
use crate::watchdog::Watchdog;

/// Where the child failed, for the error message.
const STAGES: &[&str] = &[
    "",
    "starting the watchdog",
    "setting up standard descriptors",
    "joining the cgroup",
    "changing to the working directory",
    "setting resource limits",
    "dropping capabilities",
    "switching group",
    "switching user",
    "setting no_new_privs",
    "applying the Landlock ruleset",
    "installing the seccomp filter",
    "asking for the parent-death signal",
    "exec",
    "taking a process group and leaving the terminal",
    "marking descriptors close-on-exec",
];
const WATCHDOG: u32 = 1;
const STDIO: u32 = 2;
const CGROUP: u32 = 3;
const CHDIR: u32 = 4;
const RLIMIT: u32 = 5;
const CAPS: u32 = 6;
const SETGID: u32 = 7;
const SETUID: u32 = 8;
const NO_NEW_PRIVS: u32 = 9;
const LANDLOCK: u32 = 10;
const SECCOMP: u32 = 11;
const PDEATHSIG: u32 = 12;
const EXEC: u32 = 13;
const SESSION: u32 = 14;
const CLOEXEC: u32 = 15;

/// The descriptor through which a spawned sidecar reads its token.
pub(crate) const TOKEN_FD: libc::c_int = 3;

/// The child's stack: deep enough for the one function it runs.
const STACK_BYTES: usize = 64 * 1024;

/// Everything one spawn needs, built in the daemon before the clone.
#[derive(Debug)]
pub(crate) struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    stdin: OwnedFd,
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
    token: OwnedFd,
    identity: Identity,
    privileged: bool,
    last_cap: u32,
    rlimits: Vec<(u32, libc::rlimit64)>,
    _cgroup_files: Vec<OwnedFd>,
    cgroup_fds: Vec<libc::c_int>,
    landlock: Option<libc::c_int>,
    seccomp: Vec<libc::sock_fprog>,
    watchdog: Option<Watchdog>,
    stack: Stack,
    /// The daemon's pid, to tell whether it died while the child set up.
    daemon: libc::pid_t,
    /// The highest descriptor that may be open, for the close-on-exec
    /// fallback of kernels before 5.11.
    max_fd: libc::c_int,
    failed_stage: AtomicU32,
    failed_errno: AtomicI32,
}

// SAFETY: the raw pointers point into strings, filters and a ruleset that
// the spawn's caller keeps alive; nothing is tied to the preparing thread.
unsafe impl Send for Prepared {}

/// What a spawn is asked to run, and under which sandbox.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(crate) program: &'a Path,
    pub(crate) args: &'a [OsString],
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<&'a Path>,
    pub(crate) token: &'a str,
    pub(crate) identity: Identity,
    pub(crate) rlimits: Vec<(u32, u64, u64)>,
    pub(crate) cgroup_files: Vec<OwnedFd>,
    pub(crate) landlock: Option<libc::c_int>,
    pub(crate) seccomp: &'a [BpfProgram],
    pub(crate) watchdog: Option<Watchdog>,
}

/// Builds everything the child will read: C strings, pipes, the token's
/// pipe (written and closed here, so the child inherits only its read
/// end), the limits and filters in the form the system calls take.
pub(crate) fn prepare(req: Request<'_>) -> std::io::Result<Prepared> {
    let cstring = |s: &OsStr, what: &str| {
        CString::new(s.as_bytes()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} contains a NUL byte"),
            )
        })
    };
    let program = cstring(req.program.as_os_str(), "the program path")?;
    let argv_owned = std::iter::once(Ok(program.clone()))
        .chain(req.args.iter().map(|a| cstring(a, "an argument")))
        .collect::<std::io::Result<Vec<_>>>()?;
    let envp_owned = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv, "an environment variable")
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let argv = pointers(&argv_owned);
    let envp = pointers(&envp_owned);
    let cwd = req
        .cwd
        .map(|d| cstring(d.as_os_str(), "the working directory"))
        .transpose()?;
    let stdin = high(OwnedFd::from(std::fs::File::open("/dev/null")?))?;
    let stdout = pipe()?;
    let stderr = pipe()?;
    let (token_read, token_write) = pipe()?;
    {
        use std::io::Write;
        let mut w = std::fs::File::from(token_write);
        w.write_all(req.token.as_bytes())?;
    }
    let rlimits = req
        .rlimits
        .iter()
        .map(|&(resource, cur, max)| {
            (
                resource,
                libc::rlimit64 {
                    rlim_cur: cur,
                    rlim_max: max,
                },
            )
        })
        .collect();
    let cgroup_files = req
        .cgroup_files
        .into_iter()
        .map(high)
        .collect::<std::io::Result<Vec<_>>>()?;
    let cgroup_fds = cgroup::raw(&cgroup_files);
    Ok(Prepared {
        program,
        _argv: argv_owned,
        argv,
        _envp: envp_owned,
        envp,
        cwd,
        stdin,
        stdout,
        stderr,
        token: token_read,
        identity: req.identity,
        privileged: super::has_capability(super::CAP_SETPCAP),
        last_cap: last_cap(),
        rlimits,
        _cgroup_files: cgroup_files,
        cgroup_fds,
        landlock: req.landlock,
        seccomp: req.seccomp.iter().map(|p| seccomp::fprog(p)).collect(),
        watchdog: req.watchdog,
        stack: Stack::new(STACK_BYTES)?,
        daemon: std::process::id() as libc::pid_t,
        max_fd: max_fd(),
        failed_stage: AtomicU32::new(0),
        failed_errno: AtomicI32::new(0),
    })
}

/// A started sidecar: its pid, a pidfd, and the read ends of its output.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// Clones the child, which applies the sandbox and execs. Returns once
/// the exec happened, or with the stage and error at which the child
/// stopped. `prepared` (the strings, filters and stacks the child used) is
/// consumed: nothing of it is needed after the exec.
pub(crate) fn start(mut prepared: Prepared) -> std::io::Result<Started> {
    let mut pidfd: libc::c_int = -1;
    // Every signal blocked in this thread for the clone, with the raw
    // system call (glibc's wrappers keep two of its own signals open): no
    // handler of the daemon's can run in the child, which shares its
    // memory, before the child has reset every disposition.
    let all: u64 = !0;
    let mut before: u64 = 0;
    // SAFETY: rt_sigprocmask reads and writes one kernel sigset (8 bytes).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            &mut before as *mut u64,
            8usize,
        )
    };
    let top = prepared.stack.top();
    // SAFETY: `child_main` runs on its own stack with `prepared`, which
    // outlives it: with CLONE_VFORK this call returns only once the child
    // exec'd or exited. CLONE_PIDFD writes the pidfd to `pidfd`.
    let pid = unsafe {
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&raw mut prepared).cast(),
            &raw mut pidfd,
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &before as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::new(
            clone_error.kind(),
            format!("clone: {clone_error}"),
        ));
    }
    // SAFETY: CLONE_PIDFD succeeded: `pidfd` is a new descriptor of ours.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let stage = prepared.failed_stage.load(Ordering::Relaxed);
    if stage != 0 {
        let errno = prepared.failed_errno.load(Ordering::Relaxed);
        reap_blocking(&pidfd);
        let cause = std::io::Error::from_raw_os_error(errno);
        return Err(std::io::Error::new(
            cause.kind(),
            format!(
                "{}: {cause}",
                STAGES.get(stage as usize).copied().unwrap_or("?")
            ),
        ));
    }
    Ok(Started {
        pid: pid as u32,
        pidfd,
        stdout: prepared.stdout.0,
        stderr: prepared.stderr.0,
    })
}

/// The child. Allocation-free and lock-free: raw system calls on what
/// `prepare` built.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Prepared` of `start`, alive and unchanged until
    // this process execs or exits; the daemon's thread that owns it is
    // suspended (CLONE_VFORK). Everything below is a system call on data of
    // `Prepared`, of this stack or a static path (`/dev/tty`), or a read of
    // errno: nothing allocates or takes a lock.
    unsafe {
        let p = &*arg.cast::<Prepared>();
        let stage = match apply(p) {
            Ok(()) => {
                libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
                (EXEC, errno())
            }
            Err(failure) => failure,
        };
        p.failed_stage.store(stage.0, Ordering::Relaxed);
        p.failed_errno.store(stage.1, Ordering::Relaxed);
        libc::_exit(127)
    }
}

/// Applies the sandbox in the child, in the order the kernel needs:
/// descriptors and the cgroup first, limits, then identity (capabilities
/// are needed to drop capabilities and switch uid), `no_new_privs`,
/// Landlock, and seccomp last (it may refuse calls the steps before make).
///
/// # Safety
///
/// Only in the child of `start`.
unsafe fn apply(p: &Prepared) -> Result<(), (u32, i32)> {
    // SAFETY: see `child_main`; each call is a system call with valid
    // arguments.
    unsafe {
        // Handlers are the daemon's code: none may run here or in the
        // watchdog; exec resets handled signals, not ignored ones.
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let me = libc::syscall(libc::SYS_getpid) as libc::pid_t;
        if let Some(w) = &p.watchdog {
            crate::watchdog::start_in_child(w, me, p.privileged.then_some(p.last_cap))
                .map_err(|e| (WATCHDOG, e))?;
        }
        // A process group of its own (a terminal's Ctrl-C reaches the
        // daemon, which then stops the sidecar in order) and no
        // controlling terminal to inject input into, but the daemon's
        // session: where the kernel's autogroup is on, a session of its own
        // would be a scheduling group of its own, weighed as much as the
        // whole daemon, and busy sidecars would share the CPUs less evenly
        // (docs/BENCHMARKS.md). Not the session leader, it gives the
        // terminal up alone: nobody else is signalled.
        //
        // Only ENXIO means "no controlling terminal"; any other failure to
        // open it (no descriptors left, exclusive mode, a minimal /dev)
        // cannot rule one out, so the sidecar then starts a session of its
        // own as before, which surely has none. O_NONBLOCK: opening a
        // serial line must not wait for its carrier.
        let tty = libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        );
        if tty >= 0 {
            let grouped = libc::setpgid(0, 0);
            let given_up = libc::ioctl(tty, libc::TIOCNOTTY);
            libc::close(tty);
            check(SESSION, grouped)?;
            check(SESSION, given_up)?;
        } else if errno() == libc::ENXIO {
            check(SESSION, libc::setpgid(0, 0))?;
        } else {
            check(SESSION, libc::setsid())?;
        }
        check(STDIO, libc::dup2(p.stdin.as_raw_fd(), 0))?;
        check(STDIO, libc::dup2(p.stdout.1.as_raw_fd(), 1))?;
        check(STDIO, libc::dup2(p.stderr.1.as_raw_fd(), 2))?;
        check(STDIO, libc::dup2(p.token.as_raw_fd(), TOKEN_FD))?;
        // Everything else closes at exec (the ruleset and cgroup files are
        // still used before it); one by one before Linux 5.11.
        if libc::syscall(
            libc::SYS_close_range,
            (TOKEN_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            for fd in TOKEN_FD + 1..=p.max_fd {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                    check(
                        CLOEXEC,
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC),
                    )?;
                }
            }
        }
        // The daemon's OOM protection is not the sidecar's: at the limit of
        // its cgroup the kernel must be able to kill it.
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            libc::write(adj, b"0".as_ptr().cast(), 1);
            libc::close(adj);
        }
        cgroup::join_in_child(&p.cgroup_fds).map_err(|e| (CGROUP, e))?;
        if let Some(dir) = &p.cwd {
            check(CHDIR, libc::chdir(dir.as_ptr()))?;
        }
        for (resource, limit) in &p.rlimits {
            check_long(
                RLIMIT,
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *resource,
                    limit as *const libc::rlimit64,
                    std::ptr::null_mut::<libc::rlimit64>(),
                ),
            )?;
        }
        if p.privileged {
            // Root after exec regains nothing: no capabilities in the
            // bounding set, none ambient, and the securebits locked so
            // that uid 0 confers none.
            const SECUREBITS: libc::c_ulong = 0b1110_0011;
            check(CAPS, libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS))?;
            for cap in 0..=p.last_cap {
                check(
                    CAPS,
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong),
                )?;
            }
        }
        check(
            CAPS,
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
        )?;
        if p.identity.switch {
            let (uid, gid) = (p.identity.uid, p.identity.gid);
            check_long(
                SETGID,
                libc::syscall(SYS_SETGROUPS, 0, std::ptr::null::<libc::gid_t>()),
            )?;
            check_long(SETGID, libc::syscall(SYS_SETRESGID, gid, gid, gid))?;
            check_long(SETUID, libc::syscall(SYS_SETRESUID, uid, uid, uid))?;
        }
        drop_all_capabilities().map_err(|e| (CAPS, e))?;
        if p.watchdog.is_none() {
            // No watchdog: the kernel kills the sidecar when the daemon's
            // spawning thread ends. Set after the uid switch, which clears it;
            // a daemon that died before is seen as a new parent.
            check(
                PDEATHSIG,
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            )?;
            if libc::getppid() != p.daemon {
                return Err((PDEATHSIG, libc::ESRCH));
            }
        }
        check(
            NO_NEW_PRIVS,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
        if let Some(ruleset) = p.landlock {
            check_long(
                LANDLOCK,
                libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32),
            )?;
        }
        for program in &p.seccomp {
            check_long(
                SECCOMP,
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0u32,
                    program as *const libc::sock_fprog,
                ),
            )?;
        }
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8usize,
        );
        Ok(())
    }
}

// The 32-bit id calls: on i686 and 32-bit Arm the plain ones take 16-bit ids.
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETRESGID: libc::c_long = libc::SYS_setresgid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETRESUID: libc::c_long = libc::SYS_setresuid32;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETRESGID: libc::c_long = libc::SYS_setresgid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETRESUID: libc::c_long = libc::SYS_setresuid;

/// A stack for a `CLONE_VM` child: a mapping of its own with an
/// inaccessible guard page below it, so an overflow faults instead of
/// writing into the daemon's heap.
#[derive(Debug)]
pub(crate) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by the Stack alone and not tied to a thread.
unsafe impl Send for Stack {}

impl Stack {
    /// `bytes` of stack (rounded up to pages) above one guard page.
    pub(crate) fn new(bytes: usize) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = bytes.div_ceil(page) * page + page;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping just made.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(base, len) };
            return Err(e);
        }
        Ok(Self { base, len })
    }

    /// The initial stack pointer: the top of the mapping (page aligned, so
    /// 16-byte aligned as the ABIs want).
    pub(crate) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which the stack grows
        // down from.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no child runs on it any more (a
        // CLONE_VFORK child has exec'd or exited before its clone returns).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The highest descriptor number this process may have open (its
/// RLIMIT_NOFILE, at most 65536), for the close-on-exec fallback.
fn max_fd() -> libc::c_int {
    let mut limit = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit64 writes one rlimit64.
    unsafe { libc::getrlimit64(libc::RLIMIT_NOFILE, &mut limit) };
    libc::c_int::try_from(limit.rlim_cur.min(65_536)).unwrap_or(65_536)
}

/// Empties the permitted, effective and inheritable sets (`capset`).
fn drop_all_capabilities() -> Result<(), i32> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(())
}

fn check(stage: u32, rc: libc::c_int) -> Result<(), (u32, i32)> {
    if rc < 0 {
        Err((stage, errno()))
    } else {
        Ok(())
    }
}

fn check_long(stage: u32, rc: libc::c_long) -> Result<(), (u32, i32)> {
    if rc < 0 {
        Err((stage, errno()))
    } else {
        Ok(())
    }
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno; reading it has
    // no other effect (the child shares it with the suspended thread).
    unsafe { *libc::__errno_location() }
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A close-on-exec pipe, both ends numbered above the descriptors the
/// child sets up: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into an array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((high(r)?, high(w)?))
}

/// `fd` moved to a number of 10 or more, so that the child's `dup2` onto
/// 0 to 3 never overwrites a descriptor it still needs.
pub(crate) fn high(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 10 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one or -1.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if moved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl succeeded: `moved` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// The highest capability number this kernel knows (read once).
fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

/// Waits for a child (one that failed before its exec, or in tests).
pub(crate) fn reap_blocking(pidfd: &OwnedFd) {
    // SAFETY: siginfo_t is plain old data filled by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pidfd.
    unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
}

/// Finds `program` as the daemon would run it: a path with a `/` as it is
/// (relative ones against the daemon's working directory), a bare name in
/// the daemon's `PATH`. The error says what was tried.
pub(crate) fn resolve_program(program: &Path) -> std::io::Result<PathBuf> {
    let not_found = |tried: String| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("program `{}` not found ({tried})", program.display()),
        )
    };
    if program.as_os_str().as_bytes().contains(&b'/') {
        let path = std::path::absolute(program)?;
        return match path.is_file() {
            true => Ok(path),
            false => Err(not_found(format!("no file {}", path.display()))),
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    for dir in &dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return std::path::absolute(candidate);
        }
    }
    Err(not_found(if dirs.is_empty() {
        "a bare name is looked up in the daemon's PATH, which is empty; give a path".to_owned()
    } else {
        format!(
            "looked in the daemon's PATH: {}",
            std::env::join_paths(&dirs)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    }))
}

/// A running (or ended) sidecar process, waited on through its pidfd:
/// signals never reach a reused pid.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Wraps a started process; needs the runtime's reactor.
    pub(crate) fn new(pid: u32, pidfd: OwnedFd) -> std::io::Result<Self> {
        // `with_interest` is deprecated in newer tokio for types that may
        // change their descriptor; an OwnedFd moved in cannot. Its
        // replacement does not exist in the tokio that pim-daemon 0.1.18
        // locks (1.52).
        #[allow(deprecated)]
        let pidfd = AsyncFd::with_interest(pidfd, tokio::io::Interest::READABLE)?;
        Ok(Self {
            pid,
            pidfd,
            status: None,
        })
    }

    /// The pid while the process has not been waited for.
    pub(crate) fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid)
    }

    /// Waits until the process ends and reaps it.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            if let Some(status) = self.try_reap()? {
                self.status = Some(status);
                return Ok(status);
            }
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    fn try_reap(&self) -> std::io::Result<Option<ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        let fd = self.pidfd.get_ref().as_raw_fd() as libc::id_t;
        // SAFETY: siginfo_t is plain old data filled by waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child's pidfd, without blocking and
        // without reaping: while the exited leader is a zombie, its pid and
        // so its process group's number cannot be reused, and whatever it
        // left in its group (children that did not leave it) is killed.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid for SIGCHLD information, 0 while running.
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            // SAFETY: kill has no memory-safety preconditions; the group is
            // the sidecar's (its number cannot be reused yet, see above).
            unsafe { libc::kill(-(self.pid as libc::pid_t), libc::SIGKILL) };
        }
        // SAFETY: as above, now reaping.
        let rc =
            unsafe { libc::waitid(libc::P_PIDFD, fd, &mut info, libc::WEXITED | libc::WNOHANG) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info`; si_pid and si_status are valid for
        // SIGCHLD information, and si_pid is 0 while the child runs.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        let raw = match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => status | 0x80,
            _ => status,
        };
        Ok(Some(ExitStatus::from_raw(raw)))
    }

    /// Sends `signal`; nothing when the process has been reaped.
    pub(crate) fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal with a pidfd of ours and no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        match rc {
            0 => Ok(()),
            _ => match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// SIGKILL, then wait.
    pub(crate) async fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.wait().await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // No zombie left when the process already ended.
        if self.status.is_none() {
            let _ = self.try_reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_found_in_the_daemons_path_and_a_missing_one_says_where_it_looked() {
        let found = resolve_program(Path::new("sh")).unwrap();
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        let err = resolve_program(Path::new("no-such-program-here"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("program `no-such-program-here` not found (looked in the daemon's PATH: "),
            "{err}"
        );
        let err = resolve_program(Path::new("./bin/missing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no file /") && err.ends_with("bin/missing)"),
            "{err}"
        );
    }
}
