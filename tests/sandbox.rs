//! The sandbox a spawned sidecar runs in, read off the real kernel: no
//! capabilities, `no_new_privs`, a seccomp filter, a Landlock domain, a
//! cgroup of its own, a uid of its own, the token out of its environment;
//! and the limits that stop one, with the reason the supervisor gives.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pim_plugin_bridge::proto::pb;
use pim_plugin_bridge::proto::pb::plugin_session_client::PluginSessionClient;
use pim_plugin_bridge::testkit::{FakeHost, PortCall};
use pim_plugin_bridge::{CommandSpec, EndReason, Enforcement, SidecarConfig};
use pim_protocol::ControlFrame;
use support::*;

/// A line of `/proc/<pid>/status`, without its name.
fn status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_sidecar_has_no_privileges_and_no_token_in_its_environment() {
    init_logging();
    let dir = temp_dir();
    let host = FakeHost::start(probe_named(dir.path(), "bare"), dir.path())
        .await
        .unwrap();
    let pid = host.plugin().pid().unwrap();
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status(pid, set), "0000000000000000", "{set}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Only a privileged daemon can empty the bounding set.
        assert_eq!(status(pid, "CapBnd"), "0000000000000000");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    assert_eq!(status(pid, "Seccomp"), "2", "a seccomp filter");
    let filters = if cfg!(target_arch = "x86_64") {
        "3"
    } else {
        "2"
    };
    assert_eq!(
        status(pid, "Seccomp_filters"),
        filters,
        "the deny-list, clone3 and (x86-64) the x32 guard"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("PIM_PLUGIN_TOKEN_FD=3"), "{environ}");
    assert!(
        !environ.contains(host.plugin().token()),
        "the token is in the sidecar's original environment block"
    );
    let report = host.plugin().stats().sandbox.expect("a sandbox report");
    assert_eq!(report.seccomp, Enforcement::Enforced);
    // Under CI=true Landlock must be there (its kernels have it);
    // elsewhere wherever this kernel has it.
    if std::env::var("CI").as_deref() == Ok("true") || report.landlock_abi > 0 {
        assert_eq!(report.landlock, Enforcement::Enforced, "{report:?}");
        assert!(report.landlock_abi >= 1);
    }
    if root_or_skip("a cgroup of its own needs a root daemon") {
        assert_eq!(report.cgroup, Enforcement::Enforced, "{report:?}");
        let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            groups
                .lines()
                .any(|l| l.contains(":memory:") && l.contains("-bare")),
            "{groups}"
        );
        assert!(
            groups
                .lines()
                .any(|l| l.contains(":pids:") && l.contains("-bare")),
            "{groups}"
        );
    }
    host.shutdown().await;
}

/// A copy of `bin` in a directory any uid can reach, as a sidecar of
/// another user needs (the build directory may sit under a closed home).
fn reachable_copy(bin: &Path, dir: &Path) -> PathBuf {
    let bins = dir.join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    std::fs::set_permissions(&bins, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = bins.join(bin.file_name().unwrap());
    std::fs::copy(bin, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A test directory other uids may search (a temp dir is 0700).
fn searchable_temp_dir() -> tempfile::TempDir {
    let dir = temp_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_runs_as_its_own_user_with_its_socket_and_directory_its_own() {
    init_logging();
    if !root_or_skip("switching a sidecar's uid needs a root daemon") {
        return;
    }
    let dir = searchable_temp_dir();
    let echo = reachable_copy(&echo_bin(), dir.path());
    let mut config = SidecarConfig::spawn(
        "echo",
        ["echo.ping", "echo.pong"],
        dir.path().join("sock"),
        CommandSpec::new(echo),
    );
    config.user = Some("61001".into());
    config.group = Some("61002".into());
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let pid = host.plugin().pid().unwrap();
    assert_eq!(status(pid, "Uid"), "61001\t61001\t61001\t61001");
    assert_eq!(status(pid, "Gid"), "61002\t61002\t61002\t61002");
    assert_eq!(status(pid, "Groups"), "", "supplementary groups cleared");
    assert_eq!(status(pid, "CapBnd"), "0000000000000000");
    let socket = std::fs::metadata(host.plugin().socket_path()).unwrap();
    assert_eq!(
        (socket.uid(), socket.gid(), socket.mode() & 0o777),
        (61001, 61002, 0o600)
    );
    let sock_dir = std::fs::metadata(dir.path().join("sock")).unwrap();
    assert_eq!(sock_dir.mode() & 0o777, 0o711, "searchable, not listable");
    let data = std::fs::metadata(dir.path().join("plugins/echo")).unwrap();
    assert_eq!(
        (data.uid(), data.gid(), data.mode() & 0o777),
        (61001, 61002, 0o700)
    );
    // It works: a ping is answered by name.
    let alice = node(1);
    host.ports().add_peer(alice, [1; 32], "alice");
    host.inject_payload(alice, "echo.ping", "hi").await;
    host.ports()
        .wait_until(WAIT, |calls| {
            calls
                .iter()
                .any(|c| {
                    matches!(c, PortCall::SendRouted { frame: ControlFrame::PluginPayload { kind, .. }, .. } if kind == "echo.pong")
                })
                .then_some(())
        })
        .await
        .unwrap();
    // allowed_uids defaults to the sidecar's uid: root, with the token, is refused.
    let ch = pim_sidecar::connect_channel(&host.plugin().socket_path())
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::RegisterRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", host.plugin().token()).parse().unwrap(),
    );
    let err = PluginSessionClient::new(ch)
        .register(req)
        .await
        .expect_err("root is not the plugin's uid");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("allowed uids: [61001]"), "{err:?}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_cannot_reach_its_data_directory_is_refused_naming_the_directory() {
    init_logging();
    if !root_or_skip("switching a sidecar's uid needs a root daemon") {
        return;
    }
    let dir = temp_dir();
    // Closed: uid 61001 cannot enter it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut config = SidecarConfig::spawn(
        "echo",
        ["echo.ping", "echo.pong"],
        dir.path().join("sock"),
        CommandSpec::new(echo_bin()),
    );
    config.user = Some("61001".into());
    config.required = true;
    let err = FakeHost::start(config, dir.path())
        .await
        .expect_err("unreachable data dir")
        .to_string();
    assert!(
        err.contains("uid 61001 cannot reach")
            && err.contains(&dir.path().display().to_string())
            && err.contains("mode 700"),
        "{err}"
    );
}

/// A sidecar whose command is `program args…` and that never registers.
fn plain(dir: &Path, name: &str, program: &str, args: &[&str]) -> SidecarConfig {
    let mut cmd = CommandSpec::new(program);
    cmd.args = args.iter().map(Into::into).collect();
    let mut config = SidecarConfig::spawn(name, [format!("{name}.cmd")], dir.join("sock"), cmd);
    config.wait_for_register = false;
    config.restart.initial_backoff = Duration::from_millis(50);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_past_its_cpu_time_is_stopped_and_restarted() {
    init_logging();
    let dir = temp_dir();
    let mut config = plain(dir.path(), "spin", "sh", &["-c", "while :; do :; done"]);
    config.sandbox.limits.cpu_time = Some(Duration::from_secs(1));
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    eventually("the sidecar to use up its second", || {
        host.plugin().stats().last_end.is_some()
    })
    .await;
    let end = host.plugin().stats().last_end.unwrap();
    assert_eq!(end.reason, EndReason::CpuTimeLimit, "{end:?}");
    eventually("the restart", || host.plugin().stats().restarts >= 1).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forking_sidecar_is_held_to_its_process_limit_and_leaves_nothing_behind() {
    init_logging();
    if !root_or_skip("a pids cgroup needs a root daemon") {
        return;
    }
    let dir = temp_dir();
    // Children that leave its process group, until a fork is refused.
    let script = "i=0; while [ $i -lt 200 ]; do setsid sleep 60 & i=$((i+1)); done; wait";
    let mut config = plain(dir.path(), "forks", "sh", &["-c", script]);
    config.sandbox.limits.processes = Some(16);
    config.restart.max_restarts = 0;
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    let report = host.plugin().stats().sandbox.unwrap();
    let cgroup = report
        .cgroup_paths
        .iter()
        .find(|p| p.join("pids.max").exists())
        .unwrap_or_else(|| panic!("no pids group: {report:?}"))
        .clone();
    assert_eq!(
        std::fs::read_to_string(cgroup.join("pids.max"))
            .unwrap()
            .trim(),
        "16"
    );
    eventually("the shell to give up", || host.plugin().stats().failed).await;
    let end = host.plugin().stats().last_end.unwrap();
    assert!(
        end.last_output.iter().any(|l| l.contains("Cannot fork")),
        "{end:?}"
    );
    let refused: u64 = std::fs::read_to_string(cgroup.join("pids.events"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(refused > 0, "the kernel refused no fork");
    // The children it left, outside its process group, are gone with it.
    let members = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert_eq!(members.lines().count(), 0, "left behind: {members}");
    host.shutdown().await;
    assert!(
        !cgroup.exists(),
        "the group is removed when the plugin stops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_open_files_are_refused_by_the_kernel() {
    init_logging();
    let dir = temp_dir();
    // Opens descriptors until refused, then reports how many it held.
    let script = "for i in $(seq 3 5000); do eval \"exec $i</dev/null\" 2>/dev/null || { echo opened $((i - 3)); exit 3; }; done; echo opened all; exit 4";
    let mut config = plain(dir.path(), "fds", "bash", &["-c", script]);
    config.sandbox.limits.open_files = Some(64);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    eventually("the script to stop", || {
        host.plugin().stats().last_end.is_some()
    })
    .await;
    let end = host.plugin().stats().last_end.unwrap();
    assert_eq!(end.reason, EndReason::Exited { code: 3 }, "{end:?}");
    let opened = end
        .last_output
        .iter()
        .find_map(|l| l.split("opened ").nth(1))
        .and_then(|n| n.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", end.last_output));
    // bash holds a few of its own (0 to 2, 255): the rest up to the limit.
    assert!(
        (50..64).contains(&opened),
        "held {opened} descriptors with a limit of 64"
    );
    host.shutdown().await;
}

/// One line of the hostile sidecar's report.
#[derive(Debug)]
struct Attempt {
    attack: String,
    outcome: String,
    detail: String,
}

fn report(path: &Path) -> Vec<Attempt> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Attempt {
            attack: v["attack"].as_str().unwrap_or_default().to_owned(),
            outcome: v["outcome"].as_str().unwrap_or_default().to_owned(),
            detail: v["detail"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

fn hostile_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hostile-sidecar"))
}

/// Every attack of the hostile sidecar, run as a spawned sidecar next to
/// an echo plugin and an external plugin (whose token is a file), with the
/// default sandbox: as the daemon's uid (root under CI, without any
/// capability), and as a uid of its own. Each attack is refused or
/// contained, the neighbour keeps answering, the hostile one is not even
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_sidecar_is_refused_or_contained_and_its_neighbours_work_on() {
    init_logging();
    hostile_round(None).await;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        hostile_round(Some("61003")).await;
    }
}

async fn hostile_round(user: Option<&str>) {
    let dir = searchable_temp_dir();
    let secret = dir.path().join("daemon.key");
    std::fs::write(&secret, "the daemon's signing key").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The neighbours: a spawned echo and an external plugin.
    let echo = FakeHost::start(
        SidecarConfig::spawn(
            "echo",
            ["echo.ping", "echo.pong"],
            dir.path().join("sock"),
            CommandSpec::new(echo_bin()),
        ),
        dir.path(),
    )
    .await
    .unwrap();
    let external = FakeHost::start(
        SidecarConfig::external("ext", ["ext.cmd"], dir.path().join("sock")),
        dir.path(),
    )
    .await
    .unwrap();
    let echo_pid = echo.plugin().pid().unwrap();
    let data = dir.path().join("plugins/hostile");
    let report_path = data.join("report.jsonl");
    let program = match user {
        Some(_) => reachable_copy(&hostile_bin(), dir.path()),
        None => hostile_bin(),
    };
    let join = |paths: &[&Path]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let sock = dir.path().join("sock");
    let echo_data = dir.path().join("plugins/echo");
    let tmp = std::env::temp_dir();
    let cmd = CommandSpec::new(program)
        .env("HOSTILE_REPORT", &report_path)
        .env("HOSTILE_SECRET_FILE", &secret)
        .env(
            "HOSTILE_OTHER_TOKEN_FILE",
            external.plugin().socket_path().with_extension("token"),
        )
        .env("HOSTILE_OTHER_PID", echo_pid.to_string())
        .env("HOSTILE_LIST_DIRS", join(&[&sock, &echo_data, dir.path()]))
        .env(
            "HOSTILE_WRITE_DIRS",
            join(&[dir.path(), &echo_data, &sock, &tmp]),
        )
        .env("HOSTILE_OTHER_SOCKET", echo.plugin().socket_path())
        .env("HOSTILE_OTHER_NAME", "echo")
        .env("HOSTILE_OTHER_KINDS", "echo.ping,echo.pong");
    let mut config = SidecarConfig::spawn(
        "hostile",
        ["hostile.cmd", "hostile.seq"],
        dir.path().join("sock"),
        cmd,
    );
    config.user = user.map(Into::into);
    config.sandbox.limits.processes = Some(32);
    config.sandbox.limits.open_files = Some(256);
    let hostile = FakeHost::start(config, dir.path()).await.unwrap();
    eventually("the hostile sidecar to finish its attacks", || {
        report(&report_path).iter().any(|a| a.attack == "done")
    })
    .await;
    let attempts = report(&report_path);
    for a in &attempts {
        println!(
            "figure: hostile ({}) {:<22} {:<9} {}",
            user.unwrap_or("daemon uid"),
            a.attack,
            a.outcome,
            a.detail
        );
    }
    let expected = [
        ("read_secret", "refused"),
        ("chmod_secret", "refused"),
        ("read_token_file", "refused"),
        ("read_environ", "refused"),
        ("list_dirs", "refused"),
        ("write_outside", "refused"),
        ("connect_other_socket", "refused"),
        ("read_daemon_memory", "refused"),
        ("ptrace", "refused"),
        ("signal_outside", "refused"),
        ("mount", "refused"),
        ("unshare", "refused"),
        ("bpf", "refused"),
        ("keyctl", "refused"),
        ("fork_bomb", "contained"),
        ("open_files", "contained"),
    ];
    for (attack, outcome) in expected {
        let a = attempts
            .iter()
            .find(|a| a.attack == attack)
            .unwrap_or_else(|| panic!("no report of {attack}: {attempts:?}"));
        assert_eq!(a.outcome, outcome, "{attack}: {}", a.detail);
    }
    assert!(!secret.with_file_name("hostile-was-here").exists());
    assert_eq!(
        std::fs::metadata(&secret).unwrap().mode() & 0o777,
        0o600,
        "the secret's mode changed"
    );
    // The neighbour works on; the hostile one was never stopped.
    let alice = node(1);
    echo.ports().add_peer(alice, [1; 32], "alice");
    echo.inject_payload(alice, "echo.ping", "still there?")
        .await;
    echo.ports()
        .wait_until(WAIT, |calls| {
            calls
                .iter()
                .any(|c| matches!(c, PortCall::SendRouted { frame: ControlFrame::PluginPayload { kind, .. }, .. } if kind == "echo.pong"))
                .then_some(())
        })
        .await
        .unwrap();
    assert_eq!(echo.plugin().stats().restarts, 0);
    let stats = hostile.plugin().stats();
    assert!(stats.connected && stats.restarts == 0, "{stats:?}");
    hostile.shutdown().await;
    external.shutdown().await;
    echo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_sidecar_allocating_past_its_limit_is_killed_and_restarted() {
    init_logging();
    if !root_or_skip("a memory cgroup needs a root daemon") {
        return;
    }
    let dir = temp_dir();
    let report_path = dir.path().join("plugins/hog/report.jsonl");
    let cmd = CommandSpec::new(hostile_bin())
        .env("HOSTILE_ATTACKS", "memory")
        .env("HOSTILE_KINDS", "hog.cmd")
        .env("HOSTILE_MEMORY_MIB", "1024")
        .env("HOSTILE_REPORT", &report_path);
    let mut config = SidecarConfig::spawn("hog", ["hog.cmd"], dir.path().join("sock"), cmd);
    config.sandbox.limits.memory = Some(96 * 1024 * 1024);
    let host = FakeHost::start(config, dir.path()).await.unwrap();
    eventually("the hog to be killed", || {
        host.plugin().stats().last_end.is_some()
    })
    .await;
    let end = host.plugin().stats().last_end.unwrap();
    assert_eq!(
        end.reason,
        EndReason::OutOfMemory {
            limit_bytes: Some(96 * 1024 * 1024)
        },
        "{end:?}"
    );
    let progress: Vec<_> = report(&report_path)
        .into_iter()
        .filter(|a| a.attack == "memory")
        .collect();
    assert!(
        progress.iter().all(|a| a.outcome == "progress"),
        "the allocation never failed or finished: {progress:?}"
    );
    assert!(logged(|l| l.contains(
        "sidecar process ended: killed by the kernel: out of memory (limit 96 MiB)"
    )));
    eventually("the restart", || host.plugin().stats().restarts >= 1).await;
    host.shutdown().await;
}

/// Fields of `/proc/<pid>/stat` after the command: (pgrp, session, tty_nr).
fn stat_ids(pid: u32) -> (i64, i64, i64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<i64> = after
        .split_whitespace()
        .skip(1)
        .take(5)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[1], f[2], f[3])
}

/// A daemon with a controlling terminal (a pseudo-terminal here) spawns a
/// sidecar: the sidecar has none (no terminal to inject input into), has
/// a process group of its own (a Ctrl-C reaches the daemon only), and stays
/// in the daemon's session, so that where the kernel's autogroup is on it
/// shares the daemon's scheduling group instead of weighing as much as the
/// whole daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_leaves_the_daemons_terminal_and_keeps_its_session() {
    init_logging();
    let dir = temp_dir();
    // SAFETY: posix_openpt returns a new descriptor or -1; grantpt,
    // unlockpt and ptsname_r act on that descriptor and the buffer given.
    let (master, slave) = unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
        let master = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(master);
        (master, std::ffi::CStr::from_ptr(name.as_ptr()).to_owned())
    };
    let mut cmd = tokio::process::Command::new(test_host_bin());
    cmd.arg("--dir")
        .arg(dir.path())
        .args(["--name", "tty", "--spawn"])
        .arg(probe_bin());
    // SAFETY: between fork and exec the closure makes only system calls
    // (setsid, open, ioctl, close) on a path built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
            if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let mut daemon = ChildProcess::spawn("test-host", cmd);
    let ready = daemon.wait_line("ready", |l| l.starts_with("ready ")).await;
    let sidecar: u32 = ready["ready ".len()..].parse().unwrap();
    let (_, daemon_session, daemon_tty) = stat_ids(daemon.pid());
    assert_ne!(daemon_tty, 0, "the daemon has the pseudo-terminal");
    let (pgrp, session, tty) = stat_ids(sidecar);
    println!(
        "figure: daemon session {daemon_session} tty {daemon_tty}; sidecar {sidecar}: \
         pgrp {pgrp} session {session} tty {tty}"
    );
    assert_eq!(tty, 0, "the sidecar kept the daemon's controlling terminal");
    assert_eq!(pgrp, i64::from(sidecar), "a process group of its own");
    assert_eq!(session, daemon_session, "the daemon's session");
    let autogroup = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/autogroup")).ok();
    if let Some(group) = autogroup(daemon.pid()) {
        let group = group.split_whitespace().next().map(str::to_owned);
        let theirs =
            autogroup(sidecar).and_then(|g| g.split_whitespace().next().map(str::to_owned));
        assert_eq!(theirs, group, "the daemon's autogroup");
    }
    daemon.kill().await;
    drop(master);
    eventually("the sidecar to die with its daemon", || {
        !process_exists(sidecar)
    })
    .await;
}
