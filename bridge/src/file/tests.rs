use super::*;

const FULL: &str = r#"
socket_dir = "/run/pim/plugins"

[[sidecar]]
name = "echo"
payload_kinds = ["echo.ping", "echo.pong"]
command = ["./bin/echo-sidecar", "--greeting", "hi"]
env = { ECHO_MODE = "polite" }
inherit_env = ["RUST_LOG"]
grants = ["signing_seed", "raw_control"]
allowed_uids = [0, 1000]
connections = { max_connections = 4, request_timeout = "5s" }
startup_timeout = "3s"
shutdown_grace = "1500ms"
term_grace = "1s"
stuck_timeout = "off"
queue = { max_events = 1000, max_bytes = 1048576 }
restart = { max_restarts = 2, window = "1m", initial_backoff = "10ms", max_backoff = "1s", retry_failed_after = "off" }
data_dir = "daemon"
required = true

[[sidecar]]
name = "watcher"
payload_kinds = ["watcher.x"]
external = true
socket_dir = "/tmp/other"
data_dir = "state/watcher"
"#;

#[track_caller]
fn err(text: &str) -> String {
    parse_sidecars(text, Path::new("/etc/pim"))
        .expect_err("the file is invalid")
        .to_string()
}

#[test]
fn every_setting_is_read() {
    let configs = parse_sidecars(FULL, Path::new("/etc/pim")).unwrap();
    assert_eq!(configs.len(), 2);
    let echo = &configs[0];
    assert_eq!(echo.name, "echo");
    assert_eq!(echo.socket_path(), Path::new("/run/pim/plugins/echo.sock"));
    let Launch::Spawn(cmd) = &echo.launch else {
        panic!("echo is spawned")
    };
    assert_eq!(cmd.program, Path::new("/etc/pim/./bin/echo-sidecar"));
    assert_eq!(cmd.args, ["--greeting", "hi"]);
    assert_eq!(cmd.env, [("ECHO_MODE".into(), "polite".into())]);
    assert_eq!(cmd.inherit_env, ["RUST_LOG"]);
    assert_eq!(echo.grants.names(), ["signing_seed", "raw_control"]);
    assert_eq!(echo.allowed_uids, [0, 1000]);
    assert_eq!(echo.connections.max_connections, 4);
    assert_eq!(echo.connections.request_timeout, Duration::from_secs(5));
    assert_eq!(echo.connections.max_streams_per_connection, 64, "default");
    assert_eq!(echo.startup_timeout, Duration::from_secs(3));
    assert_eq!(echo.shutdown_grace, Duration::from_millis(1500));
    assert_eq!(echo.term_grace, Duration::from_secs(1));
    assert_eq!(echo.stuck_timeout, None);
    assert_eq!(echo.queue.max_events, 1000);
    assert_eq!(echo.restart.max_restarts, 2);
    assert_eq!(echo.restart.retry_failed_after, None);
    assert_eq!(echo.data_dir, crate::DataDir::Daemon);
    assert!(echo.required);
    assert_eq!(echo.restart.window, Duration::from_secs(60));
    let watcher = &configs[1];
    assert!(matches!(watcher.launch, Launch::External));
    assert!(!watcher.wait_for_register);
    assert_eq!(watcher.socket_path(), Path::new("/tmp/other/watcher.sock"));
    assert_eq!(
        watcher.stuck_timeout,
        Some(Duration::from_secs(30)),
        "default"
    );
}

#[test]
fn errors_name_the_field() {
    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kindz = [\"a.b\"]\n");
    assert!(e.contains("unknown field `payload_kindz`"), "{e}");
    assert!(e.contains("line 4"), "{e}");

    let e = err("[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\ncommand = [\"x\"]\n");
    assert!(e.contains("sidecar[0].socket_dir"), "{e}");

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\n");
    assert!(
        e.contains("sidecar[0].command") && e.contains("external = true"),
        "{e}"
    );

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\", \"\"]\ncommand = [\"x\"]\n");
    assert!(
        e.contains("sidecar[0].payload_kinds[1]") && e.contains("1..=255"),
        "{e}"
    );

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\ncommand = [\"x\"]\nshutdown_grace = \"5 secs\"\n");
    assert!(e.contains("shutdown_grace") && e.contains("\"5s\""), "{e}");

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\ncommand = [\"x\"]\ngrants = [\"root\"]\n");
    assert!(e.contains("unknown variant `root`"), "{e}");

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\ncommand = [\"x\"]\n[[sidecar]]\nname = \"b\"\npayload_kinds = [\"a.b\"]\ncommand = [\"y\"]\n");
    assert!(
        e.contains("sidecar[1].payload_kinds") && e.contains("already claimed by sidecar[0] `a`"),
        "{e}"
    );

    let e = err("socket_dir = \"/x\"\n[[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.b\"]\ncommand = [\"x\"]\nqueue = { max_bytes = 10 }\n");
    assert!(e.contains("sidecar[0].queue.max_bytes"), "{e}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn files_turn_into_daemon_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecars.toml");
    std::fs::write(&path, FULL).unwrap();
    let plugins = plugins_from_file(&path).unwrap();
    let names: Vec<_> = plugins.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["echo", "watcher"]);
    assert_eq!(plugins[0].payload_kinds(), ["echo.ping", "echo.pong"]);
    let Err(missing) = plugins_from_file(&dir.path().join("nope.toml")) else {
        panic!("a missing file is an error")
    };
    let missing = missing.to_string();
    assert!(missing.contains("nope.toml"), "{missing}");
}

#[test]
fn data_dir_and_failure_policy_default_and_resolve() {
    let configs = parse_sidecars(FULL, Path::new("/etc/pim")).unwrap();
    let watcher = &configs[1];
    assert_eq!(
        watcher.data_dir,
        crate::DataDir::Path("/etc/pim/state/watcher".into())
    );
    assert!(!watcher.required, "optional by default");
    assert_eq!(
        watcher.restart.retry_failed_after,
        Some(Duration::from_secs(300))
    );
    let own = crate::DataDir::default();
    assert_eq!(
        own.resolve(Path::new("/var/lib/pim"), "echo"),
        Path::new("/var/lib/pim/plugins/echo")
    );
    let text = "socket_dir = \"/s\"\n[[sidecar]]\nname = \"e\"\npayload_kinds = [\"e.x\"]\nexternal = true\ndata_dir = \"\"\n";
    assert!(err(text).contains("sidecar[0].data_dir"), "{}", err(text));
}

/// The README's "every setting, with its default" block parses, and each
/// value it shows is the code's default.
#[test]
fn the_readme_settings_are_the_defaults() {
    let block = readme_settings(false);
    let configs = parse_sidecars(&block, Path::new("/etc/pim")).expect("the README's block parses");
    let shown = &configs[0];
    let defaults = SidecarConfig::spawn("echo", ["echo.ping"], "/x", CommandSpec::new("/y"));
    assert_eq!(shown.connections, defaults.connections);
    assert_eq!(shown.queue, defaults.queue);
    assert_eq!(shown.restart, defaults.restart);
    assert_eq!(shown.data_dir, defaults.data_dir);
    assert_eq!(shown.required, defaults.required);
    assert_eq!(shown.wait_for_register, defaults.wait_for_register);
    assert_eq!(shown.startup_timeout, defaults.startup_timeout);
    assert_eq!(shown.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(shown.term_grace, defaults.term_grace);
    assert_eq!(shown.stuck_timeout, defaults.stuck_timeout);
    assert_eq!(shown.allowed_uids, defaults.allowed_uids);
    assert_eq!(shown.grants, defaults.grants);
    assert_eq!(shown.sandbox, defaults.sandbox);
    assert_eq!(
        (&shown.user, &shown.group),
        (&defaults.user, &defaults.group)
    );
    // The file's own default: one budget for all its sidecars.
    let budget = shown.queue_budget.as_ref().expect("a budget");
    assert_eq!(budget.max_bytes() as u64, crate::file::DEFAULT_QUEUE_BUDGET);
    let without = parse_sidecars(
        &block.replace("queue_budget = \"256MiB\"", ""),
        Path::new("/etc/pim"),
    )
    .expect("parses");
    assert_eq!(
        without[0]
            .queue_budget
            .as_ref()
            .map(crate::QueueBudget::max_bytes),
        Some(budget.max_bytes()),
        "the README shows the default"
    );
}

#[test]
fn the_sidecars_of_a_file_share_one_queue_budget_which_may_be_off() {
    let two = |budget: &str| {
        format!(
            "socket_dir = \"/run/pim\"\n{budget}\n\
             [[sidecar]]\nname = \"a\"\npayload_kinds = [\"a.k\"]\nexternal = true\n\
             [[sidecar]]\nname = \"b\"\npayload_kinds = [\"b.k\"]\nexternal = true\n"
        )
    };
    let configs = parse_sidecars(&two("queue_budget = \"1MiB\""), Path::new("/")).unwrap();
    let (a, b) = (
        configs[0].queue_budget.clone().unwrap(),
        configs[1].queue_budget.clone().unwrap(),
    );
    assert_eq!(a.max_bytes(), 1 << 20);
    // Shared, not two budgets of the same size: a plugin's queue charges both.
    let plugin = crate::SidecarPlugin::new(configs[0].clone()).unwrap();
    block_on(pim_plugin::DaemonPlugin::handle_payload(
        &plugin,
        pim_core::NodeId::from_bytes([1; 16]),
        "a.k",
        bytes::Bytes::from_static(&[0; 100]),
    ));
    assert!(a.used() >= 100 && a.used() == b.used(), "{a:?} {b:?}");
    drop(plugin);
    assert_eq!(b.used(), 0, "a dropped plugin gives its share back");

    let off = parse_sidecars(&two("queue_budget = \"off\""), Path::new("/")).unwrap();
    assert!(off.iter().all(|c| c.queue_budget.is_none()));
    let e = parse_sidecars(&two("queue_budget = 0"), Path::new("/")).unwrap_err();
    assert!(e.to_string().contains("queue_budget"), "{e}");
    let e = parse_sidecars(&two("queue_budget = \"lots\""), Path::new("/")).unwrap_err();
    assert!(e.to_string().contains("queue_budget"), "{e}");
}

/// Runs a future that never waits (the bridge's `handle_payload`).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(f)
}

#[test]
fn the_sandbox_settings_are_read_and_bad_ones_named() {
    let text = r#"
[[sidecar]]
name = "echo"
payload_kinds = ["echo.ping"]
command = ["/bin/echo-sidecar"]
socket_dir = "/run/pim"
user = 61001
group = "pim-echo"

[sidecar.sandbox]
landlock = false
read_paths = ["share"]
write_paths = ["/var/cache/echo"]
allow_syscalls = ["ptrace"]
deny_syscalls = ["kill"]
token_env = true
limits = { memory = "2GiB", processes = "off", open_files = 4096, cpu_time = "1h" }
"#;
    let c = &parse_sidecars(text, Path::new("/etc/pim")).unwrap()[0];
    assert_eq!(c.user.as_deref(), Some("61001"));
    assert_eq!(c.group.as_deref(), Some("pim-echo"));
    let b = &c.sandbox;
    assert!(!b.landlock && b.seccomp && b.token_env);
    assert_eq!(b.read_paths, vec![PathBuf::from("/etc/pim/share")]);
    assert_eq!(b.write_paths, vec![PathBuf::from("/var/cache/echo")]);
    assert_eq!(
        (b.allow_syscalls.as_slice(), b.deny_syscalls.as_slice()),
        (&["ptrace".to_owned()][..], &["kill".to_owned()][..])
    );
    assert_eq!(b.limits.memory, Some(2 << 30));
    assert_eq!(b.limits.processes, None);
    assert_eq!(b.limits.open_files, Some(4096));
    assert_eq!(b.limits.cpu_time, Some(Duration::from_secs(3600)));
    let bad = |limits: &str| {
        err(&text.replace(
        r#"limits = { memory = "2GiB", processes = "off", open_files = 4096, cpu_time = "1h" }"#,
        limits,
    ))
    };
    let e = bad(r#"limits = { memory = "2GB" }"#);
    assert!(e.contains("expected a size like"), "{e}");
    let e = bad(r#"limits = { memory = "1MiB" }"#);
    assert!(
        e.contains("sidecar[0].sandbox.limits.memory") && e.contains("at least 4 MiB"),
        "{e}"
    );
    let e = bad(r#"limits = { open_files = 3 }"#);
    assert!(e.contains("sidecar[0].sandbox.limits.open_files"), "{e}");
    let e = bad(r#"limits = { processes = "lots" }"#);
    assert!(
        e.contains(r#"expected a number or \"off\""#) || e.contains("expected a number or"),
        "{e}"
    );
    let e = bad(r#"limits = { frobs = 1 }"#);
    assert!(e.contains("frobs"), "{e}");
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert!(parse_size("99999999999GiB")
        .unwrap_err()
        .contains("more than 2^64"));
}

#[test]
fn a_duration_too_long_is_an_error_not_a_panic() {
    let e = parse_duration("6000000000000000h").unwrap_err();
    assert!(
        e.contains("longer than the longest duration accepted, 100 years"),
        "{e}"
    );
    assert!(parse_duration("99999999999999999999ms").is_err());
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
}

/// The README's "every setting, with its default" block; with `all`, its
/// commented-out settings (`# user = …`, not defaults) taken in.
fn readme_settings(all: bool) -> String {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("Every setting, with its default:\n\n```toml\n")
        .expect("the README has the settings block");
    let block = &readme[start..];
    let block = &block[block.find("```toml\n").unwrap() + 8..];
    let block = &block[..block.find("```").unwrap()];
    block
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting) if all && setting.contains(" = ") => setting,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `text` sets `key` (`key = `, not a longer key ending in it).
fn sets_key(text: &str, key: &str) -> bool {
    let pattern = format!("{key} = ");
    text.match_indices(&pattern).any(|(i, _)| {
        text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

/// The keys a table of the sidecars file accepts, from the parser's own
/// "unknown field" error.
fn accepted_keys(doc: &str) -> Vec<String> {
    let err = parse_sidecars(doc, Path::new("/")).unwrap_err().to_string();
    let expected = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no key list in: {err}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Docs that cannot drift: the README's settings block names every key the
/// file accepts (its values are the defaults: the test above).
#[test]
fn the_readme_settings_block_names_every_key() {
    let block = readme_settings(true);
    let sidecar = "[[sidecar]]\nname = \"e\"\npayload_kinds = [\"e.k\"]\nexternal = true\n";
    let tables = [
        ("the file", "zz_unknown = 1\n".to_owned()),
        ("[[sidecar]]", format!("{sidecar}zz_unknown = 1\n")),
        (
            "connections",
            format!("{sidecar}connections = {{ zz_unknown = 1 }}\n"),
        ),
        ("queue", format!("{sidecar}queue = {{ zz_unknown = 1 }}\n")),
        (
            "restart",
            format!("{sidecar}restart = {{ zz_unknown = 1 }}\n"),
        ),
        (
            "sandbox",
            format!("{sidecar}sandbox = {{ zz_unknown = 1 }}\n"),
        ),
        (
            "sandbox.limits",
            format!("{sidecar}sandbox = {{ limits = {{ zz_unknown = 1 }} }}\n"),
        ),
    ];
    // The file's own keys come before the first `[[sidecar]]`; a sidecar's
    // (and its tables') after it.
    let at = block.find("[[sidecar]]").expect("a [[sidecar]] table");
    let (file_part, sidecar_part) = block.split_at(at);
    for (table, doc) in tables {
        let keys = accepted_keys(&doc);
        assert!(keys.len() >= 2, "{table}: {keys:?}");
        let part = if table == "the file" {
            file_part
        } else {
            sidecar_part
        };
        for key in keys {
            assert!(
                sets_key(part, &key) || block.contains(&format!("[[{key}]]")),
                "the README's settings block lacks `{key}` of {table}"
            );
        }
    }
    assert!(sets_key("env = {}", "env") && !sets_key("inherit_env = []", "env"));
}
