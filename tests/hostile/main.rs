//! The hostile sidecar used by the sandbox tests: it registers like any
//! plugin, then tries to break out of its sandbox, one attack after
//! another, and reports what each attack achieved, so a test can assert
//! that every one of them was refused or contained.
//!
//! Its name is `PIM_PLUGIN_NAME` (default `hostile`); its kinds are those in
//! `HOSTILE_KINDS` (comma separated), else `hostile.cmd` and `hostile.seq`.
//! Payloads are accepted and ignored. Once registered, a thread of its own
//! runs the attacks named in `HOSTILE_ATTACKS` (comma separated, in that
//! order; default: every attack but the lethal `memory`), while the sidecar
//! keeps handling events.
//!
//! After each attack it appends one JSON line to the file `HOSTILE_REPORT`
//! (opened `O_APPEND`, written at once: a later attack may get the process
//! killed) and prints it on stdout:
//!
//! ```text
//! {"attack":"<name>","outcome":"refused|succeeded|contained|skipped","detail":"<errno text or what happened>"}
//! ```
//!
//! `succeeded` means the attack worked, that is, the sandbox failed;
//! `skipped` means the attack's input variable is not set (`no target
//! given`). After the last attack it writes
//! `{"attack":"done","outcome":"done","detail":""}`; `memory` also writes
//! `{"attack":"memory","outcome":"progress","detail":"<n> MiB"}` every 64 MiB.
//!
//! The attacks and their inputs: `read_secret` and `chmod_secret`
//! (`HOSTILE_SECRET_FILE`),
//! `read_token_file` (`HOSTILE_OTHER_TOKEN_FILE`), `read_environ`
//! (`HOSTILE_OTHER_PID`), `list_dirs` (`HOSTILE_LIST_DIRS`, comma separated),
//! `write_outside` (`HOSTILE_WRITE_DIRS`, comma separated),
//! `connect_other_socket` (`HOSTILE_OTHER_SOCKET`; it registers there as
//! `HOSTILE_OTHER_NAME` with `HOSTILE_OTHER_KINDS`, by default its own name
//! and kinds, presenting the token the two attacks before stole),
//! `read_daemon_memory`, `ptrace` and `signal_outside` (at the parent
//! process, the daemon, and at its own children, the watchdog), `mount`
//! (`HOSTILE_MOUNT_DIR`, default its data directory), `unshare`, `bpf`,
//! `keyctl`, `fork_bomb` (`HOSTILE_FORKS`, default 1000), `open_files`
//! (`HOSTILE_FILES`, default 100000) and `memory` (`HOSTILE_MEMORY_MIB`,
//! default 4096).

use std::alloc::Layout;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use pim_sidecar::proto::pb::plugin_session_client::PluginSessionClient;
use pim_sidecar::proto::{auth, pb};
use pim_sidecar::{async_trait, Bytes, Context, NodeId, Sidecar};

/// The payload kinds claimed when `HOSTILE_KINDS` is not set.
const DEFAULT_KINDS: [&str; 2] = ["hostile.cmd", "hostile.seq"];

/// How long `connect_other_socket` waits for the other host's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `bpf(2)` command that creates a map.
const BPF_MAP_CREATE: libc::c_long = 0;
/// `BPF_MAP_TYPE_ARRAY` of `enum bpf_map_type`.
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// The process keyring, for `add_key(2)`.
const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
/// `keyctl(2)` operation that removes a key from a keyring.
const KEYCTL_UNLINK: libc::c_long = 9;

/// Allocation unit of the `memory` attack.
const MEMORY_CHUNK: usize = 16 << 20;
/// The page size assumed when touching memory.
const PAGE: usize = 4096;

/// What an attack achieved.
#[derive(Clone, Copy)]
enum Outcome {
    /// The sandbox refused it.
    Refused,
    /// It worked: the sandbox failed.
    Succeeded,
    /// It ran into a limit before doing all the harm it meant to.
    Contained,
    /// Its input was not given.
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Succeeded => "succeeded",
            Self::Contained => "contained",
            Self::Skipped => "skipped",
        }
    }
}

/// The outcome of one attack and what happened, for the report.
struct Finding {
    outcome: Outcome,
    detail: String,
}

impl Finding {
    fn new(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
        }
    }

    fn refused(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Refused, detail)
    }

    fn succeeded(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Succeeded, detail)
    }

    fn contained(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Contained, detail)
    }

    fn no_target() -> Self {
        Self::new(Outcome::Skipped, "no target given")
    }
}

/// One attack of the table.
struct Attack {
    name: &'static str,
    /// Whether it may well get the process killed (run only when named).
    lethal: bool,
    run: fn(&mut Attacker) -> Finding,
}

/// Every attack, in the default order.
const ATTACKS: &[Attack] = &[
    Attack {
        name: "read_secret",
        lethal: false,
        run: read_secret,
    },
    Attack {
        name: "chmod_secret",
        lethal: false,
        run: chmod_secret,
    },
    Attack {
        name: "read_token_file",
        lethal: false,
        run: read_token_file,
    },
    Attack {
        name: "read_environ",
        lethal: false,
        run: read_environ,
    },
    Attack {
        name: "list_dirs",
        lethal: false,
        run: list_dirs,
    },
    Attack {
        name: "write_outside",
        lethal: false,
        run: write_outside,
    },
    Attack {
        name: "connect_other_socket",
        lethal: false,
        run: connect_other_socket,
    },
    Attack {
        name: "read_daemon_memory",
        lethal: false,
        run: read_daemon_memory,
    },
    Attack {
        name: "ptrace",
        lethal: false,
        run: ptrace,
    },
    Attack {
        name: "signal_outside",
        lethal: false,
        run: signal_outside,
    },
    Attack {
        name: "mount",
        lethal: false,
        run: mount,
    },
    Attack {
        name: "unshare",
        lethal: false,
        run: unshare,
    },
    Attack {
        name: "bpf",
        lethal: false,
        run: bpf,
    },
    Attack {
        name: "keyctl",
        lethal: false,
        run: keyctl,
    },
    Attack {
        name: "fork_bomb",
        lethal: false,
        run: fork_bomb,
    },
    Attack {
        name: "open_files",
        lethal: false,
        run: open_files,
    },
    Attack {
        name: "memory",
        lethal: true,
        run: memory,
    },
];

/// The report: `HOSTILE_REPORT` (when set) and stdout.
struct Report {
    file: Option<File>,
}

impl Report {
    fn open() -> Self {
        let Some(path) = env_var("HOSTILE_REPORT") else {
            let _ = writeln!(
                std::io::stderr(),
                "HOSTILE_REPORT is not set: reporting on stdout only"
            );
            return Self { file: None };
        };
        match OpenOptions::new().append(true).create(true).open(&path) {
            Ok(file) => Self { file: Some(file) },
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "cannot open the report {path}: {e}");
                Self { file: None }
            }
        }
    }

    /// Appends one line, in a single write, and prints it.
    fn line(&mut self, attack: &str, outcome: &str, detail: &str) {
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let line = format!(
            "{{\"attack\":{},\"outcome\":{},\"detail\":{}}}\n",
            text(attack),
            text(outcome),
            text(detail)
        );
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
                let _ = writeln!(std::io::stderr(), "writing the report: {e}");
            }
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush());
    }
}

/// What the attacks share: the report, the sidecar's identity and the
/// token the first attacks stole.
struct Attacker {
    report: Report,
    data_dir: PathBuf,
    name: &'static str,
    kinds: Vec<&'static str>,
    /// The daemon: the parent process.
    ppid: libc::pid_t,
    /// A stolen token and the attack that stole it.
    stolen: Option<(String, &'static str)>,
}

impl Attacker {
    /// Runs the selected attacks in order, reporting each at once, then `done`.
    fn run_all(mut self) {
        let selected: Vec<String> = match std::env::var("HOSTILE_ATTACKS") {
            Ok(list) => split_list(&list),
            Err(_) => ATTACKS
                .iter()
                .filter(|a| !a.lethal)
                .map(|a| a.name.to_owned())
                .collect(),
        };
        for name in &selected {
            let finding = match ATTACKS.iter().find(|a| a.name == name) {
                Some(attack) => (attack.run)(&mut self),
                None => Finding::new(Outcome::Skipped, "unknown attack"),
            };
            self.report
                .line(name, finding.outcome.as_str(), &finding.detail);
        }
        self.report.line("done", "done", "");
    }
}

/// `name`'s value, `None` when unset or empty.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The non-empty items of a comma-separated list.
fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `name`'s comma-separated items, `None` when there are none.
fn env_list(name: &str) -> Option<Vec<String>> {
    let items = split_list(&env_var(name)?);
    (!items.is_empty()).then_some(items)
}

/// `name`'s value as a count, `default` when unset or not a number.
fn env_count(name: &str, default: usize) -> usize {
    env_var(name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The text of the last OS error (errno).
fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

/// `read_secret`: reads `HOSTILE_SECRET_FILE`.
fn read_secret(_: &mut Attacker) -> Finding {
    let Some(path) = env_var("HOSTILE_SECRET_FILE") else {
        return Finding::no_target();
    };
    match std::fs::read(&path) {
        Ok(bytes) => Finding::succeeded(format!("read {} bytes of {path}", bytes.len())),
        Err(e) => Finding::refused(format!("{path}: {e}")),
    }
}

/// `chmod_secret`: makes `HOSTILE_SECRET_FILE` readable by everyone, as a
/// capless uid 0 may (it owns root's files) unless something stops it.
fn chmod_secret(_: &mut Attacker) -> Finding {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = env_var("HOSTILE_SECRET_FILE") else {
        return Finding::no_target();
    };
    match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)) {
        Ok(()) => Finding::succeeded(format!("made {path} mode 644")),
        Err(e) => Finding::refused(format!("chmod {path}: {e}")),
    }
}

/// `read_token_file`: reads `HOSTILE_OTHER_TOKEN_FILE`, another plugin's
/// token, and keeps it for `connect_other_socket`.
fn read_token_file(attacker: &mut Attacker) -> Finding {
    let Some(path) = env_var("HOSTILE_OTHER_TOKEN_FILE") else {
        return Finding::no_target();
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            let detail = format!("read {} bytes of {path}", text.len());
            if !token.is_empty() {
                attacker.stolen = Some((token, "read_token_file"));
            }
            Finding::succeeded(detail)
        }
        Err(e) => Finding::refused(format!("{path}: {e}")),
    }
}

/// `read_environ`: reads `/proc/<HOSTILE_OTHER_PID>/environ`, and keeps a
/// `PIM_PLUGIN_TOKEN` found there for `connect_other_socket`.
fn read_environ(attacker: &mut Attacker) -> Finding {
    let Some(pid) = env_var("HOSTILE_OTHER_PID") else {
        return Finding::no_target();
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return Finding::new(
            Outcome::Skipped,
            format!("HOSTILE_OTHER_PID={pid:?} is not a pid"),
        );
    };
    let path = format!("/proc/{pid}/environ");
    let environ = match std::fs::read(&path) {
        Ok(environ) => environ,
        Err(e) => return Finding::refused(format!("{path}: {e}")),
    };
    let token = environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"PIM_PLUGIN_TOKEN="))
        .map(|t| String::from_utf8_lossy(t).into_owned());
    let has_token = token.is_some();
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        attacker.stolen.get_or_insert((token, "read_environ"));
    }
    Finding::succeeded(format!(
        "read {} bytes of {path}; contains PIM_PLUGIN_TOKEN=: {}",
        environ.len(),
        if has_token { "yes" } else { "no" }
    ))
}

/// `list_dirs`: lists each directory of `HOSTILE_LIST_DIRS`.
fn list_dirs(_: &mut Attacker) -> Finding {
    let Some(dirs) = env_list("HOSTILE_LIST_DIRS") else {
        return Finding::no_target();
    };
    let mut listed = Vec::new();
    let mut notes = Vec::new();
    for dir in &dirs {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let names: Vec<String> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                listed.push(format!("{dir} ({} entries)", names.len()));
            }
            Err(e) => notes.push(format!("{dir}: {e}")),
        }
    }
    if listed.is_empty() {
        Finding::refused(notes.join("; "))
    } else {
        notes.insert(0, format!("listed {}", listed.join(", ")));
        Finding::succeeded(notes.join("; "))
    }
}

/// `write_outside`: creates `hostile-was-here` in each directory of
/// `HOSTILE_WRITE_DIRS` (and removes the files it managed to create).
fn write_outside(_: &mut Attacker) -> Finding {
    let Some(dirs) = env_list("HOSTILE_WRITE_DIRS") else {
        return Finding::no_target();
    };
    let mut written = Vec::new();
    let mut notes = Vec::new();
    for dir in &dirs {
        let path = Path::new(dir).join("hostile-was-here");
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                drop(file);
                match std::fs::remove_file(&path) {
                    Ok(()) => written.push(path.display().to_string()),
                    Err(e) => written.push(format!("{} (not removed: {e})", path.display())),
                }
            }
            Err(e) => notes.push(format!("{}: {e}", path.display())),
        }
    }
    if written.is_empty() {
        Finding::refused(notes.join("; "))
    } else {
        notes.insert(0, format!("created {}", written.join(", ")));
        Finding::succeeded(notes.join("; "))
    }
}

/// `connect_other_socket`: connects to another plugin's socket
/// (`HOSTILE_OTHER_SOCKET`) and calls Register there with the stolen token.
fn connect_other_socket(attacker: &mut Attacker) -> Finding {
    let Some(socket) = env_var("HOSTILE_OTHER_SOCKET") else {
        return Finding::no_target();
    };
    if let Err(e) = std::os::unix::net::UnixStream::connect(&socket) {
        return Finding::refused(format!("connect {socket}: {e}"));
    }
    let (token, source) = attacker
        .stolen
        .clone()
        .unwrap_or((String::new(), "none (nothing was stolen)"));
    let name = env_var("HOSTILE_OTHER_NAME").unwrap_or_else(|| attacker.name.to_owned());
    let kinds = env_list("HOSTILE_OTHER_KINDS")
        .unwrap_or_else(|| attacker.kinds.iter().map(|k| (*k).to_owned()).collect());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Finding::refused(format!("connected, but no runtime for the call: {e}")),
    };
    let call = register_on(Path::new(&socket), &token, &name, kinds);
    match runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await }) {
        Ok(Ok(resp)) => Finding::succeeded(format!(
            "Register as `{name}` on {socket} returned OK (data_dir {}), token: {source}",
            resp.data_dir
        )),
        Ok(Err(e)) => Finding::refused(format!("{e} (token: {source})")),
        Err(_) => Finding::refused(format!(
            "connected, but Register did not answer within {CALL_TIMEOUT:?} (token: {source})"
        )),
    }
}

/// Calls `PluginSession/Register` on the socket at `path` as `name`,
/// presenting `token`. The error is the gRPC status code name and message,
/// or why there was no channel.
async fn register_on(
    path: &Path,
    token: &str,
    name: &str,
    kinds: Vec<String>,
) -> Result<pb::RegisterResponse, String> {
    let channel = pim_sidecar::connect_channel(path)
        .await
        .map_err(|e| format!("connected, but the gRPC channel failed: {e}"))?;
    let mut req = tonic::Request::new(pb::RegisterRequest {
        protocol_version: pim_sidecar::proto::PROTOCOL_VERSION,
        plugin_name: name.to_owned(),
        payload_kinds: kinds,
        sdk_name: "hostile-sidecar".into(),
        sdk_version: env!("CARGO_PKG_VERSION").into(),
        // The nastiest request: take the session from its client.
        takeover: true,
    });
    match auth::bearer(token).parse() {
        Ok(value) => {
            req.metadata_mut().insert(auth::METADATA_KEY, value);
        }
        Err(_) => return Err("the stolen token is not valid metadata".into()),
    }
    PluginSessionClient::new(channel)
        .register(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// `read_daemon_memory`: reads 64 bytes of the daemon's first readable
/// mapping through `/proc/<ppid>/mem` and through `process_vm_readv`.
fn read_daemon_memory(attacker: &mut Attacker) -> Finding {
    let pid = attacker.ppid;
    let maps = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(maps) => maps,
        Err(e) => return Finding::refused(format!("/proc/{pid}/maps: {e}")),
    };
    let Some((addr, mapping)) = first_readable_mapping(&maps) else {
        return Finding::refused(format!("/proc/{pid}/maps shows no readable mapping"));
    };
    let mut buf = [0u8; 64];
    let via_mem =
        File::open(format!("/proc/{pid}/mem")).and_then(|mem| mem.read_at(&mut buf, addr));
    let via_vm = process_vm_read(pid, addr, &mut buf);
    let describe = |r: &std::io::Result<usize>| match r {
        Ok(n) => format!("read {n} bytes"),
        Err(e) => e.to_string(),
    };
    let detail = format!(
        "mapping `{mapping}`: /proc/{pid}/mem: {}; process_vm_readv: {}",
        describe(&via_mem),
        describe(&via_vm)
    );
    let read = |r: &std::io::Result<usize>| matches!(r, Ok(n) if *n > 0);
    if read(&via_mem) || read(&via_vm) {
        Finding::succeeded(detail)
    } else {
        Finding::refused(detail)
    }
}

/// The start address and line of the first readable mapping of a
/// `/proc/<pid>/maps`, leaving out the kernel's special ones (`[vvar]`,
/// `[vsyscall]`), which no process can read through `mem`.
fn first_readable_mapping(maps: &str) -> Option<(u64, &str)> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let special = line.ends_with("[vvar]")
            || line.ends_with("[vvar_vclock]")
            || line.ends_with("[vsyscall]");
        if !perms.starts_with('r') || special {
            return None;
        }
        let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
        Some((start, line))
    })
}

/// `process_vm_readv` of `buf.len()` bytes at `addr` in process `pid`.
fn process_vm_read(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: std::ptr::without_provenance_mut(addr as usize),
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, valid for writes of its whole length
    // during the call; `remote` is an address in another process, which the
    // kernel checks itself; both iovecs live on this stack for the call.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// `ptrace`: `PTRACE_SEIZE` of the daemon, detached again at once.
fn ptrace(attacker: &mut Attacker) -> Finding {
    let pid = attacker.ppid;
    // A tracee belongs to the tracing thread, and a tracer thread's exit
    // detaches its tracees: seizing from a thread of its own detaches the
    // daemon even when PTRACE_DETACH cannot (it only works on a stopped
    // tracee, and a seized one keeps running).
    let tracer = std::thread::Builder::new()
        .name("hostile-ptrace".into())
        .spawn(move || {
            let null = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: PTRACE_SEIZE with null addr and data takes no memory
            // of this process; it only asks the kernel to trace `pid`.
            if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) } != 0 {
                return Err(errno_text());
            }
            // SAFETY: PTRACE_DETACH with null addr and data (no signal to
            // deliver) takes no memory of this process.
            let detached = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) } == 0;
            Ok(if detached {
                "detached again".to_owned()
            } else {
                format!(
                    "PTRACE_DETACH: {}; the tracer thread's exit detached it",
                    errno_text()
                )
            })
        });
    match tracer.map(|t| t.join()) {
        Ok(Ok(Ok(detached))) => {
            Finding::succeeded(format!("seized the daemon (pid {pid}); {detached}"))
        }
        Ok(Ok(Err(e))) => Finding::refused(format!("PTRACE_SEIZE of pid {pid}: {e}")),
        Ok(Err(_)) => Finding::refused("the tracer thread panicked"),
        Err(e) => Finding::refused(format!("no thread to trace from: {e}")),
    }
}

/// `signal_outside`: `kill(ppid, 0)`, and SIGKILL to each of its own
/// children (the watchdog).
fn signal_outside(attacker: &mut Attacker) -> Finding {
    let pid = attacker.ppid;
    let parent = if pid <= 0 {
        // In a PID namespace of its own the daemon has no pid here, and
        // kill(0, …) would signal this process group instead.
        Err(format!("not visible (getppid() = {pid})"))
    } else {
        may_signal(pid)
    };
    let mut notes = vec![match &parent {
        Ok(()) => format!("kill({pid}, 0) (the daemon) worked"),
        Err(e) => format!("kill({pid}, 0) (the daemon): {e}"),
    }];
    let children = own_children();
    if children.is_empty() {
        notes.push("no child process found".into());
    }
    let mut killed = false;
    for child in children {
        let what = format!("{child} `{}`", command_line(child));
        // SAFETY: kill takes no memory of this process; `child` is a child
        // of this process, so the pid cannot have been reused until we reap.
        if unsafe { libc::kill(child, libc::SIGKILL) } == 0 {
            reap(child);
            killed = true;
            notes.push(format!("killed child {what}"));
        } else {
            notes.push(format!("kill child {what}: {}", errno_text()));
        }
    }
    let detail = notes.join("; ");
    if parent.is_ok() || killed {
        Finding::succeeded(detail)
    } else {
        Finding::refused(detail)
    }
}

/// Whether this process may signal `pid`: `kill(pid, 0)`, which sends nothing.
fn may_signal(pid: libc::pid_t) -> Result<(), String> {
    // SAFETY: kill takes no memory of this process; signal 0 only checks
    // permission.
    if unsafe { libc::kill(pid, 0) } == 0 {
        Ok(())
    } else {
        Err(errno_text())
    }
}

/// This process's children: those listed in
/// `/proc/self/task/<tid>/children` of every thread, or else those whose
/// parent `/proc/<pid>/stat` names this process.
fn own_children() -> Vec<libc::pid_t> {
    let parse = |text: &str| -> Vec<libc::pid_t> {
        text.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut children = Vec::new();
    let mut any_listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.filter_map(Result::ok) {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                any_listed = true;
                children.extend(parse(&list));
            }
        }
    }
    if !any_listed {
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            if after_comm.split_whitespace().nth(1) == Some(me.as_str()) {
                children.extend(parse(&entry.file_name().to_string_lossy()));
            }
        }
    }
    children.sort_unstable();
    children.dedup();
    children
}

/// A process's command line, for the report.
fn command_line(pid: libc::pid_t) -> String {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) if !raw.is_empty() => raw
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
        _ => "?".into(),
    }
}

/// Waits for child `pid` to end.
fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live c_int on this stack for the call.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// `mount`: a tmpfs on `HOSTILE_MOUNT_DIR` (default its data directory),
/// unmounted again if it worked.
fn mount(attacker: &mut Attacker) -> Finding {
    let target =
        env_var("HOSTILE_MOUNT_DIR").map_or_else(|| attacker.data_dir.clone(), PathBuf::from);
    let Ok(c_target) = CString::new(target.as_os_str().as_bytes()) else {
        return Finding::refused(format!("{} holds a NUL byte", target.display()));
    };
    // SAFETY: the source, target and type are NUL-terminated strings that
    // live through the call; a null data pointer means no options.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c_target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Finding::refused(format!(
            "mount tmpfs on {}: {}",
            target.display(),
            errno_text()
        ));
    }
    // SAFETY: `c_target` is a NUL-terminated string that lives through the call.
    let unmounted = match unsafe { libc::umount2(c_target.as_ptr(), 0) } {
        0 => "unmounted again".to_owned(),
        _ => format!("umount: {}", errno_text()),
    };
    Finding::succeeded(format!(
        "mounted a tmpfs on {}; {unmounted}",
        target.display()
    ))
}

/// `unshare`: new mount and user namespaces through `unshare`, and a user
/// namespace through a raw `clone`.
fn unshare(_: &mut Attacker) -> Finding {
    let tries = [
        ("unshare(CLONE_NEWNS)", unshare_in_child(libc::CLONE_NEWNS)),
        (
            "unshare(CLONE_NEWUSER)",
            unshare_in_child(libc::CLONE_NEWUSER),
        ),
        ("clone(CLONE_NEWUSER)", clone_new_user()),
    ];
    let worked = tries.iter().any(|(_, r)| r.is_ok());
    let detail = tries
        .iter()
        .map(|(what, r)| match r {
            Ok(()) => format!("{what} worked"),
            Err(e) => format!("{what}: {e}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    if worked {
        Finding::succeeded(detail)
    } else {
        Finding::refused(detail)
    }
}

/// Tries `unshare(flag)` in a forked, single-threaded child: unsharing a
/// user namespace is refused to any multi-threaded process (`EINVAL`), and
/// a namespace that worked must not change this process.
fn unshare_in_child(flag: libc::c_int) -> Result<(), String> {
    // SAFETY: the child of this multi-threaded process calls only
    // async-signal-safe functions (unshare, reading errno, _exit).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork to try it in: {}", errno_text())),
        0 => {
            // SAFETY: in the forked child: unshare takes no pointers; reading
            // errno does not allocate; _exit ends the child at once.
            unsafe {
                let code = if libc::unshare(flag) == 0 {
                    0
                } else {
                    std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(255)
                };
                libc::_exit(code.clamp(0, 255))
            }
        }
        child => match reap(child) {
            Some(status) if libc::WIFEXITED(status) => match libc::WEXITSTATUS(status) {
                0 => Ok(()),
                code => Err(std::io::Error::from_raw_os_error(code).to_string()),
            },
            Some(status) if libc::WIFSIGNALED(status) => Err(format!(
                "the child trying it was killed by signal {}",
                libc::WTERMSIG(status)
            )),
            _ => Err("the child trying it could not be reaped".into()),
        },
    }
}

/// A raw `clone(CLONE_NEWUSER | SIGCHLD)` whose child exits at once.
fn clone_new_user() -> Result<(), String> {
    let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: without CLONE_VM this clone is a fork: the child gets a copy
    // of this address space, running on its copy of this thread's stack (a
    // null stack argument), and only calls _exit. The tid and tls arguments
    // are zero, so the kernel writes nothing into this process.
    let r = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match r {
        // SAFETY: in the cloned child, _exit ends it at once.
        0 => unsafe { libc::_exit(0) },
        r if r < 0 => Err(errno_text()),
        child => {
            reap(child as libc::pid_t);
            Ok(())
        }
    }
}

/// `bpf`: creates a one-entry array map.
fn bpf(_: &mut Attacker) -> Finding {
    // The head of `union bpf_attr` for BPF_MAP_CREATE: map_type, key_size,
    // value_size, max_entries; the rest (flags, names, …) stays zero.
    let mut attr = [0u32; 18];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 4, 1]);
    // SAFETY: `attr` is an initialized buffer of the size passed, alive for
    // the call; BPF_MAP_CREATE only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Finding::refused(format!("bpf(BPF_MAP_CREATE): {}", errno_text()));
    }
    // SAFETY: `fd` is the map's descriptor, just returned and used nowhere else.
    unsafe { libc::close(fd as libc::c_int) };
    Finding::succeeded(format!("bpf(BPF_MAP_CREATE) returned fd {fd}"))
}

/// `keyctl`: adds a key to the process keyring (and unlinks it again).
fn keyctl(_: &mut Attacker) -> Finding {
    // SAFETY: type, description and payload point to live buffers (two
    // NUL-terminated strings and one byte, whose length is passed).
    let key = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            c"user".as_ptr(),
            c"hostile".as_ptr(),
            b"x".as_ptr(),
            1usize,
            KEY_SPEC_PROCESS_KEYRING,
        )
    };
    if key < 0 {
        return Finding::refused(format!("add_key: {}", errno_text()));
    }
    // SAFETY: KEYCTL_UNLINK takes two key serial numbers, no pointers.
    unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_UNLINK,
            key,
            KEY_SPEC_PROCESS_KEYRING,
        )
    };
    Finding::succeeded(format!("add_key returned key {key}"))
}

/// `fork_bomb`: forks idle children up to `HOSTILE_FORKS`, then kills them.
fn fork_bomb(_: &mut Attacker) -> Finding {
    let target = env_count("HOSTILE_FORKS", 1000);
    let me = std::process::id() as libc::pid_t;
    let mut children = Vec::new();
    let mut failure = None;
    while children.len() < target {
        // SAFETY: the child of this multi-threaded process runs only
        // `idle_child`, which calls async-signal-safe functions only.
        match unsafe { libc::fork() } {
            -1 => {
                failure = Some(errno_text());
                break;
            }
            0 => idle_child(me),
            child => children.push(child),
        }
    }
    let forked = children.len();
    for &child in &children {
        // SAFETY: kill takes no memory; `child` is an unreaped child of ours.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    for &child in &children {
        reap(child);
    }
    match failure {
        Some(e) => Finding::contained(format!("forked {forked} of {target}, then fork: {e}")),
        None => Finding::succeeded(format!("forked all {target} children")),
    }
}

/// A fork bomb's child: dies with the thread that forked it, else waits
/// for signals until killed. Async-signal-safe calls only.
fn idle_child(parent: libc::pid_t) -> ! {
    // SAFETY: prctl, getppid, pause and _exit are plain system calls that
    // take no pointers; they are async-signal-safe.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        loop {
            libc::pause();
        }
    }
}

/// `open_files`: opens `/dev/null` up to `HOSTILE_FILES` times, keeping
/// every descriptor open, then closes them all.
fn open_files(_: &mut Attacker) -> Finding {
    let target = env_count("HOSTILE_FILES", 100_000);
    let mut files: Vec<OwnedFd> = Vec::new();
    // Should the sandbox hide /dev/null, descriptors are taken by
    // duplicating stderr instead: they count against the same limit.
    let mut duplicate_stderr = None;
    let mut failure = None;
    while files.len() < target {
        let opened = match &duplicate_stderr {
            None => File::open("/dev/null").map(OwnedFd::from),
            Some(_) => std::io::stderr().as_fd().try_clone_to_owned(),
        };
        match opened {
            Ok(fd) => files.push(fd),
            Err(e) if files.is_empty() && duplicate_stderr.is_none() => {
                duplicate_stderr = Some(format!(" (/dev/null: {e}; duplicated stderr instead)"));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let opened = files.len();
    drop(files);
    let note = duplicate_stderr.unwrap_or_default();
    match failure {
        Some(e) => Finding::contained(format!("opened {opened} of {target}, then: {e}{note}")),
        None => Finding::succeeded(format!("opened all {target}{note}")),
    }
}

/// `memory`: allocates and touches `HOSTILE_MEMORY_MIB` MiB, 16 MiB at a
/// time, reporting progress every 64 MiB.
fn memory(attacker: &mut Attacker) -> Finding {
    let target = env_count("HOSTILE_MEMORY_MIB", 4096);
    let layout = Layout::from_size_align(MEMORY_CHUNK, PAGE).expect("16 MiB at 4 KiB is a layout");
    let mut chunks = Vec::new();
    let mut mib = 0;
    let mut failure = None;
    while mib < target {
        // SAFETY: the layout's size is not zero.
        let chunk = unsafe { std::alloc::alloc(layout) };
        if chunk.is_null() {
            failure = Some(errno_text());
            break;
        }
        for offset in (0..MEMORY_CHUNK).step_by(PAGE) {
            // SAFETY: `offset` is within the chunk just allocated; the write
            // is volatile so that the page really is touched.
            unsafe { chunk.add(offset).write_volatile(1) };
        }
        chunks.push(chunk);
        mib += MEMORY_CHUNK >> 20;
        if mib % 64 == 0 {
            attacker
                .report
                .line("memory", "progress", &format!("{mib} MiB"));
        }
    }
    for chunk in chunks {
        // SAFETY: `chunk` came from `alloc` with this layout, freed once.
        unsafe { std::alloc::dealloc(chunk, layout) };
    }
    match failure {
        Some(e) => Finding::contained(format!(
            "allocated {mib} MiB of {target}, then the allocator returned null: {e}"
        )),
        None => Finding::succeeded(format!("allocated and touched {mib} MiB")),
    }
}

/// The sidecar itself: registers, starts the attacks, ignores payloads.
struct Hostile {
    name: &'static str,
    kinds: Vec<&'static str>,
}

#[async_trait]
impl Sidecar for Hostile {
    fn name(&self) -> &str {
        self.name
    }

    fn payload_kinds(&self) -> &[&str] {
        &self.kinds
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let attacker = Attacker {
            report: Report::open(),
            data_dir: ctx.data_dir,
            name: self.name,
            kinds: self.kinds.clone(),
            ppid: std::os::unix::process::parent_id() as libc::pid_t,
            stolen: None,
        };
        std::thread::Builder::new()
            .name("hostile-attacks".into())
            .spawn(move || attacker.run_all())?;
        Ok(())
    }

    async fn handle_payload(&self, _: NodeId, _: &str, _: Bytes) -> anyhow::Result<()> {
        Ok(())
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn main() -> ExitCode {
    let name = leak(std::env::var("PIM_PLUGIN_NAME").unwrap_or_else(|_| "hostile".into()));
    let kinds = env_list("HOSTILE_KINDS")
        .map(|kinds| kinds.into_iter().map(leak).collect())
        .unwrap_or_else(|| DEFAULT_KINDS.to_vec());
    pim_sidecar::run(Hostile { name, kinds })
}
