//! A sidecar's own cgroup (v1 `memory` and `pids` controllers): its memory
//! and process limits, whether the kernel killed it for memory, and every
//! process it left behind.
//!
//! The group is `<controller mount>/<the daemon's group>/pim-<daemon pid>-<n>-<plugin>`,
//! made when the plugin starts and removed when it stops. The child joins it before exec by writing `0` to the
//! `cgroup.procs` files the daemon opened, so nothing it starts escapes.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The cgroup of one plugin's sidecar.
#[derive(Debug)]
pub(crate) struct Cgroup {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    memory_limit: Option<u64>,
}

impl Cgroup {
    /// Makes (or reuses) the plugin's group in each controller that this
    /// daemon can write, and sets the limits. `Err` says why there is none.
    pub(crate) fn create(
        plugin: &str,
        memory: Option<u64>,
        pids: Option<u64>,
    ) -> Result<Self, String> {
        // Unique in the process too: one process may host two plugins of
        // one name (for two daemons, or in tests).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let leaf = format!("pim-{}-{n}-{plugin}", std::process::id());
        let mut group = Self {
            memory: None,
            pids: None,
            memory_limit: memory,
        };
        let mut why = Vec::new();
        if let Some(bytes) = memory {
            match make(controller_dir("memory"), &leaf) {
                Ok(dir) => {
                    group.memory = Some(dir.clone());
                    if let Err(e) = write(&dir.join("memory.limit_in_bytes"), &bytes.to_string()) {
                        why.push(format!("memory: {e}"));
                    }
                    // With swap accounting, swap counts against the limit too.
                    let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &bytes.to_string());
                }
                Err(e) => why.push(format!("memory: {e}")),
            }
        }
        if let Some(max) = pids {
            match make(controller_dir("pids"), &leaf) {
                Ok(dir) => {
                    group.pids = Some(dir.clone());
                    if let Err(e) = write(&dir.join("pids.max"), &max.to_string()) {
                        why.push(format!("pids: {e}"));
                    }
                }
                Err(e) => why.push(format!("pids: {e}")),
            }
        }
        if why.is_empty() {
            Ok(group)
        } else {
            group.remove();
            Err(why.join("; "))
        }
    }

    /// The group's directories, one per controller.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        [&self.memory, &self.pids]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether memory is limited by the cgroup (not by an rlimit).
    pub(crate) fn limits_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Whether processes are limited by the cgroup.
    pub(crate) fn limits_processes(&self) -> bool {
        self.pids.is_some()
    }

    /// The `cgroup.procs` files, opened for the child to join.
    pub(crate) fn join_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        [&self.memory, &self.pids]
            .into_iter()
            .flatten()
            .map(|dir| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// Times the kernel's OOM killer has killed a process of this group.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some(dir) = &self.memory else { return 0 };
        std::fs::read_to_string(dir.join("memory.oom_control"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The memory limit in bytes, if the cgroup sets one.
    pub(crate) fn memory_limit(&self) -> Option<u64> {
        self.memory.as_ref().and(self.memory_limit)
    }

    /// SIGKILLs every process left in the group (a sidecar's children
    /// that outlived it), until none is left or a second has passed.
    pub(crate) fn kill_all(&self) {
        let Some(dir) = self.pids.as_ref().or(self.memory.as_ref()) else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() || std::time::Instant::now() > deadline {
                return;
            }
            for pid in pids {
                kill_member(pid, dir);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Kills what is left and removes the group's directories.
    pub(crate) fn remove(&mut self) {
        self.kill_all();
        for dir in [self.memory.take(), self.pids.take()].into_iter().flatten() {
            // The kernel frees a group once its last process is reaped.
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// SIGKILLs `pid` if it is still a member of the group at `dir`: through
/// a pidfd, taken before the membership is checked, so a pid that exited
/// and was reused meanwhile is never signalled.
fn kill_member(pid: i32, dir: &Path) {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    let Ok(fd) = libc::c_int::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    // SAFETY: pidfd_open succeeded: `fd` is ours.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let leaf = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|groups| groups.lines().any(|l| l.ends_with(&format!("/{leaf}"))));
    if member {
        // SAFETY: pidfd_send_signal on the pidfd just checked, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
    }
}

/// The child's side: joins every group (`0` is the writing process).
/// Async-signal-safe: one `write` per descriptor.
pub(crate) fn join_in_child(fds: &[libc::c_int]) -> Result<(), i32> {
    for &fd in fds {
        // SAFETY: write of two bytes from a static buffer to a descriptor
        // the daemon opened for this; a raw system call.
        let n = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
        if n < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The daemon's own group in the v1 hierarchy of `controller`.
fn controller_dir(controller: &str) -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    // "… <mount point> … - cgroup cgroup rw,memory"
    let mount = mounts
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split(' ');
            if right.next()? != "cgroup" {
                return None;
            }
            let options = right.nth(1)?;
            options
                .split(',')
                .any(|o| o == controller)
                .then(|| left.split(' ').nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| format!("no cgroup v1 `{controller}` hierarchy is mounted"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then_some(path)
        })
        .unwrap_or("/");
    Ok(mount.join(path.trim_start_matches('/')))
}

fn make(parent: Result<PathBuf, String>, leaf: &str) -> Result<PathBuf, String> {
    let dir = parent?.join(leaf);
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(format!("creating {}: {e}", dir.display())),
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value} to {}: {e}", path.display()))
}

/// The raw descriptors of `files`, for the child.
pub(crate) fn raw(files: &[OwnedFd]) -> Vec<libc::c_int> {
    files.iter().map(AsRawFd::as_raw_fd).collect()
}
