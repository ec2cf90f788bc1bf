//! The seccomp deny-list of a sidecar, compiled by `seccompiler` in the
//! daemon and installed by the child just before exec.

use std::collections::BTreeSet;

use seccompiler::{sock_filter, BpfProgram, TargetArch};

/// See [`super::default_denied_syscalls`]. Names this architecture does
/// not have are left out when the filter is compiled.
pub(crate) const DEFAULT_DENIED: &[&str] = &[
    // Other processes' memory and execution.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // Mounts, namespaces, the root.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    // The kernel itself.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "iopl",
    "ioperm",
    "syslog",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "lookup_dcookie",
    "vhangup",
    // The kernel keyring.
    "keyctl",
    "add_key",
    "request_key",
    // io_uring runs operations that this filter does not see.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // The host's clock and names.
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
];

/// `clone` flags that create namespaces: refused like `unshare`.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The compiled filters: the deny-list (`EPERM`) and `clone3` (`ENOSYS`).
/// `None` on an architecture `seccompiler` does not know.
/// Compiled once per process for each configuration (compiling costs
/// about two milliseconds; most plugins share the default).
pub(crate) fn filters(
    allow: &[String],
    deny: &[String],
) -> Result<Option<Vec<BpfProgram>>, String> {
    type Cache = std::collections::HashMap<(Vec<String>, Vec<String>), Option<Vec<BpfProgram>>>;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (allow.to_vec(), deny.to_vec());
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let built = build(allow, deny)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, built.clone());
    Ok(built)
}

fn build(allow: &[String], deny: &[String]) -> Result<Option<Vec<BpfProgram>>, String> {
    let Some(arch) = target_arch() else {
        return Ok(None);
    };
    let known = |name: &str| compile(arch, &[name.to_owned()], false).is_ok();
    for (field, names) in [("allow_syscalls", allow), ("deny_syscalls", deny)] {
        for name in names {
            if !known(name) {
                return Err(format!(
                    "sandbox.{field}: `{name}` is not a system call of this architecture"
                ));
            }
        }
    }
    let denied: BTreeSet<String> = DEFAULT_DENIED
        .iter()
        .map(|&s| s.to_owned())
        .filter(|name| known(name))
        .chain(deny.iter().cloned())
        .filter(|name| !allow.contains(name))
        .collect();
    let denied: Vec<String> = denied.into_iter().collect();
    let clone_namespaces = !allow.iter().any(|a| a == "unshare" || a == "clone");
    let mut programs = vec![compile(arch, &denied, clone_namespaces)?];
    if !allow.iter().any(|a| a == "clone3") {
        programs.push(compile_json(
            arch,
            &serde_json::json!({
                "clone3": {
                    "mismatch_action": "allow",
                    "match_action": { "errno": libc::ENOSYS },
                    "filter": [{ "syscall": "clone3" }],
                }
            }),
            "clone3",
        )?);
    }
    Ok(Some(programs))
}

fn compile(
    arch: TargetArch,
    denied: &[String],
    clone_namespaces: bool,
) -> Result<BpfProgram, String> {
    let mut rules: Vec<serde_json::Value> = denied
        .iter()
        .map(|name| serde_json::json!({ "syscall": name }))
        .collect();
    if clone_namespaces {
        rules.extend(NAMESPACE_FLAGS.iter().map(|flag| {
            serde_json::json!({
                "syscall": "clone",
                "args": [{ "index": 0, "type": "qword", "op": { "masked_eq": flag }, "val": flag }],
            })
        }));
    }
    compile_json(
        arch,
        &serde_json::json!({
            "deny": {
                "mismatch_action": "allow",
                "match_action": { "errno": libc::EPERM },
                "filter": rules,
            }
        }),
        "deny",
    )
}

fn compile_json(
    arch: TargetArch,
    doc: &serde_json::Value,
    name: &str,
) -> Result<BpfProgram, String> {
    let text = doc.to_string();
    let mut map = seccompiler::compile_from_json(text.as_bytes(), arch)
        .map_err(|e| format!("compiling the seccomp filter: {e}"))?;
    map.remove(name)
        .ok_or_else(|| format!("compiling the seccomp filter: no program `{name}`"))
}

fn target_arch() -> Option<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH).ok()
}

/// A compiled program as the `seccomp` system call takes it.
pub(crate) fn fprog(program: &[sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(u16::MAX),
        // The kernel only reads through this pointer.
        filter: program.as_ptr().cast_mut().cast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_compiles_and_bad_names_are_named() {
        let programs = filters(&[], &[]).unwrap().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs[0].len() > DEFAULT_DENIED.len());
        let err = filters(&["no_such_call".into()], &[]).unwrap_err();
        assert!(
            err.contains("sandbox.allow_syscalls: `no_such_call`"),
            "{err}"
        );
        let err = filters(&[], &["frobnicate".into()]).unwrap_err();
        assert!(err.contains("sandbox.deny_syscalls"), "{err}");
        let fewer = filters(&["ptrace".into(), "clone3".into()], &[])
            .unwrap()
            .unwrap();
        assert_eq!(fewer.len(), 1);
        assert!(fewer[0].len() < programs[0].len());
    }
}
