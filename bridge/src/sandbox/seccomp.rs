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

/// What a sidecar that runs as uid 0 may not do besides: change the mode,
/// owner or extended attributes of a file. Without capabilities it still
/// owns every root-owned file, and Landlock does not govern metadata: it
/// could make a program setuid root or the node key world-readable.
pub(crate) const DENIED_AS_ROOT: &[&str] = &[
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
];

/// The compiled filters: the deny-list (`EPERM`), `clone3` (`ENOSYS`) and,
/// on x86-64, the x32 system calls (`ENOSYS`), whose numbers the deny-list
/// does not match. `None` on an architecture `seccompiler` does not know.
/// Compiled once per process for each configuration (compiling costs
/// about two milliseconds; most plugins share the default).
pub(crate) fn filters(
    allow: &[String],
    deny: &[String],
    as_root: bool,
) -> Result<Option<Vec<BpfProgram>>, String> {
    type Key = (Vec<String>, Vec<String>, bool);
    type Cache = std::collections::HashMap<Key, Option<Vec<BpfProgram>>>;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (allow.to_vec(), deny.to_vec(), as_root);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let built = build(allow, deny, as_root)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, built.clone());
    Ok(built)
}

fn build(
    allow: &[String],
    deny: &[String],
    as_root: bool,
) -> Result<Option<Vec<BpfProgram>>, String> {
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
    let as_root_list: &[&str] = if as_root { DENIED_AS_ROOT } else { &[] };
    let denied: BTreeSet<String> = DEFAULT_DENIED
        .iter()
        .chain(as_root_list)
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
    if arch == TargetArch::x86_64 {
        programs.push(no_x32());
    }
    Ok(Some(programs))
}

/// On x86-64, x32 system calls carry the x86-64 audit architecture with bit
/// 30 set in their number, so a list of x86-64 numbers does not match them.
/// Where a kernel enables the x32 ABI this program answers all of them
/// `ENOSYS`. Six instructions, the one thing `seccompiler` cannot express
/// (a range of numbers).
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // struct seccomp_data: int nr; __u32 arch; ...
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(LD_W_ABS, 0, 0, ARCH),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(LD_W_ABS, 0, 0, NR),
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
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
    let program = map
        .remove(name)
        .ok_or_else(|| format!("compiling the seccomp filter: no program `{name}`"))?;
    // The kernel takes at most BPF_MAXINSNS (4096) instructions per filter.
    if program.len() > 4096 {
        return Err(format!(
            "sandbox.deny_syscalls: the filter compiles to {} instructions, the kernel takes at most 4096",
            program.len()
        ));
    }
    Ok(program)
}

fn target_arch() -> Option<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH).ok()
}

/// A compiled program as the `seccomp` system call takes it.
pub(crate) fn fprog(program: &[sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog {
        // At most 4096 instructions: `compile` refuses longer programs.
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
        let programs = filters(&[], &[], false).unwrap().unwrap();
        assert_eq!(
            programs.len(),
            if cfg!(target_arch = "x86_64") { 3 } else { 2 }
        );
        let as_root = filters(&[], &[], true).unwrap().unwrap();
        assert!(as_root[0].len() > programs[0].len());
        assert!(programs[0].len() > DEFAULT_DENIED.len());
        let err = filters(&["no_such_call".into()], &[], false).unwrap_err();
        assert!(
            err.contains("sandbox.allow_syscalls: `no_such_call`"),
            "{err}"
        );
        let err = filters(&[], &["frobnicate".into()], false).unwrap_err();
        assert!(err.contains("sandbox.deny_syscalls"), "{err}");
        let fewer = filters(&["ptrace".into(), "clone3".into()], &[], false)
            .unwrap()
            .unwrap();
        assert_eq!(fewer.len(), programs.len() - 1);
        assert!(fewer[0].len() < programs[0].len());
    }
}
