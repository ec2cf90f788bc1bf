//! The Landlock ruleset of a sidecar: built in the daemon, applied by the
//! child with one `landlock_restrict_self` before exec.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};

/// The rights this build asks for: file-system rights through ABI 5 and the
/// signal and abstract-socket scopes of ABI 6. An older kernel enforces
/// what it knows (the crate's best-effort mode).
const TARGET: ABI = ABI::V6;

/// What a program needs to run on a usual Linux system, read-only: the
/// system's programs and libraries, the dynamic loader's configuration,
/// name resolution, time zones, CA certificates and the OpenSSL configuration (not private keys),
/// `/proc` (the entries of other processes that ptrace guards, `mem`,
/// `environ`, `maps`, are refused by Landlock's ptrace scoping; `cmdline`
/// and `status` stay readable, as for any process) and the CPU count.
/// Paths that do not exist are left out.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/passwd",
    "/etc/group",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/pki/ca-trust",
    "/etc/pki/tls/certs",
    "/etc/alternatives",
    "/etc/os-release",
    "/proc",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];

/// Devices every program may write.
const SYSTEM_WRITE: &[&str] = &["/dev/null"];

/// The kernel's Landlock ABI version, 0 without Landlock.
pub(crate) fn kernel_abi() -> u32 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the
    // VERSION flag only returns a number (or -1 with errno).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// The ruleset for a sidecar that runs `program` (and `interpreter`, for a
/// script) and may write `write`. `None`: this kernel has no Landlock.
pub(crate) fn ruleset(
    program: &Path,
    interpreter: Option<&Path>,
    read: &[PathBuf],
    write: &[PathBuf],
) -> Result<Option<OwnedFd>, String> {
    let failed = |e: landlock::RulesetError| format!("building the Landlock ruleset: {e}");
    let read_rights = AccessFs::from_read(TARGET);
    let all = AccessFs::from_all(TARGET);
    let mut readable: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
    readable.push(program.to_owned());
    readable.extend(interpreter.map(Path::to_owned));
    readable.extend(read.iter().cloned());
    let writable = SYSTEM_WRITE
        .iter()
        .map(PathBuf::from)
        .chain(write.iter().cloned());
    let created = Ruleset::default()
        .handle_access(all)
        .map_err(failed)?
        .scope(Scope::from_all(TARGET))
        .map_err(failed)?
        .create()
        .map_err(failed)?
        .add_rules(path_beneath_rules(readable, read_rights))
        .map_err(failed)?
        .add_rules(path_beneath_rules(writable, all))
        .map_err(failed)?;
    Ok(created.into())
}

/// The interpreter a `#!` script names, if `program` is one.
pub(crate) fn script_interpreter(program: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let text = std::str::from_utf8(line).ok()?;
    let path = text.split_whitespace().next()?;
    std::fs::canonicalize(path).ok()
}
