//! Spawning and supervising a sidecar process: clean environment, log
//! forwarding, restart with backoff, and the kill order at shutdown.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pim_plugin_proto::{env, EXIT_REFUSED, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{CommandSpec, RestartPolicy};
use crate::queue::EventQueue;

/// Lines of the sidecar's output kept for error messages.
const TAIL_LINES: usize = 20;

/// What the supervisor has seen so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct SupervisorState {
    /// Processes spawned, the first included.
    pub(crate) spawns: u64,
    /// How the last process ended, if one has.
    pub(crate) last_exit: Option<String>,
    /// Whether the crash-loop limit was reached; the plugin stays down.
    pub(crate) failed: bool,
    /// The running process's id.
    pub(crate) pid: Option<u32>,
    /// Delays before the most recent restarts (at most 16).
    pub(crate) delays: Vec<Duration>,
    /// Restarts because the sidecar was stuck.
    pub(crate) stuck_restarts: u64,
    /// The seq it was last stuck on.
    pub(crate) last_stuck_seq: Option<u64>,
}

/// A handle to the supervising task.
#[derive(Debug)]
pub(crate) struct Supervisor {
    state: watch::Receiver<SupervisorState>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Everything a spawn needs.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub(crate) plugin: &'static str,
    pub(crate) command: CommandSpec,
    pub(crate) socket: std::path::PathBuf,
    pub(crate) token: Arc<str>,
    pub(crate) restart: RestartPolicy,
    pub(crate) queue: Arc<EventQueue>,
    pub(crate) stuck_timeout: Option<Duration>,
    pub(crate) shutdown_grace: Duration,
    pub(crate) term_grace: Duration,
}

impl Supervisor {
    /// Spawns the first process and supervises it from a task.
    pub(crate) async fn start(spec: SpawnSpec) -> std::io::Result<Self> {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let child = spawn(&spec, &tail).await?;
        let (state_tx, state) = watch::channel(SupervisorState {
            spawns: 1,
            pid: child.child.id(),
            ..SupervisorState::default()
        });
        let stop = CancellationToken::new();
        let span = tracing::info_span!("sidecar", plugin = spec.plugin);
        let task = tokio::spawn(
            supervise(spec, child, state_tx, tail.clone(), stop.clone()).instrument(span),
        );
        Ok(Self {
            state,
            tail,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    /// A snapshot of the state.
    pub(crate) fn state(&self) -> SupervisorState {
        self.state.borrow().clone()
    }

    /// Subscribes to state changes.
    pub(crate) fn watch(&self) -> watch::Receiver<SupervisorState> {
        self.state.clone()
    }

    /// The last lines the sidecar printed.
    pub(crate) fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Stops supervising: waits up to the shutdown grace for the process to
    /// exit by itself, then SIGTERM, then SIGKILL after the term grace.
    /// Idempotent.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// A running child and the tasks forwarding its output.
struct Running {
    child: Child,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits until the forwarders saw end of file (bounded: a grandchild may
    /// hold the pipes open), so the last lines are in the tail.
    async fn drain(&mut self) {
        for task in self.forwarders.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

async fn supervise(
    spec: SpawnSpec,
    mut running: Running,
    state: watch::Sender<SupervisorState>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stop: CancellationToken,
) {
    let mut recent_exits: VecDeque<Instant> = VecDeque::new();
    let mut backoff = spec.restart.initial_backoff;
    loop {
        let status = tokio::select! {
            status = running.child.wait() => status,
            () = stop.cancelled() => {
                let how = terminate(&mut running.child, &spec).await;
                running.drain().await;
                state.send_modify(|s| {
                    s.pid = None;
                    s.last_exit = Some(how);
                });
                return;
            }
            seq = stuck(&spec) => {
                tracing::error!(
                    seq,
                    timeout_ms = spec.stuck_timeout.unwrap_or_default().as_millis() as u64,
                    "sidecar stuck: no ack progress on seq {seq}; killing it to restart"
                );
                state.send_modify(|s| {
                    s.stuck_restarts += 1;
                    s.last_stuck_seq = Some(seq);
                });
                let _ = running.child.kill().await;
                running.child.wait().await
            }
        };
        running.drain().await;
        let how = describe_exit(&status);
        tracing::warn!(exit = %how, "sidecar process ended");
        state.send_modify(|s| {
            s.last_exit = Some(how);
            s.pid = None;
        });
        if matches!(&status, Ok(s) if s.code() == Some(i32::from(EXIT_REFUSED))) {
            tracing::error!("the host refused the sidecar's Register (see its output above): not restarting; plugin marked failed");
            state.send_modify(|s| s.failed = true);
            return;
        }
        let now = Instant::now();
        recent_exits.push_back(now);
        while recent_exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > spec.restart.window)
        {
            recent_exits.pop_front();
        }
        if recent_exits.len() > spec.restart.max_restarts as usize {
            tracing::error!(
                restarts = spec.restart.max_restarts,
                window_s = spec.restart.window.as_secs_f64(),
                "sidecar crash loop: restart limit reached, plugin marked failed"
            );
            state.send_modify(|s| s.failed = true);
            return;
        }
        let delay = jitter(backoff);
        tracing::info!(delay_ms = delay.as_millis() as u64, "restarting sidecar");
        state.send_modify(|s| {
            if s.delays.len() == 16 {
                s.delays.remove(0);
            }
            s.delays.push(delay);
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(spec.restart.max_backoff);
        match spawn(&spec, &tail).await {
            Ok(r) => {
                running = r;
                state.send_modify(|s| {
                    s.spawns += 1;
                    s.pid = running.child.id();
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "respawning the sidecar failed; plugin marked failed");
                state.send_modify(|s| s.failed = true);
                return;
            }
        }
    }
}

/// Resolves with the stuck seq once the queue has had events pending and
/// no progress for the stuck timeout; never when the timeout is disabled.
async fn stuck(spec: &SpawnSpec) -> u64 {
    let Some(timeout) = spec.stuck_timeout else {
        return std::future::pending().await;
    };
    let period = (timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        if let Some((seq, idle)) = spec.queue.stalled() {
            if idle >= timeout {
                return seq;
            }
        }
    }
}

/// The kill order: wait for a voluntary exit, SIGTERM, wait, SIGKILL.
/// Returns how the process ended.
async fn terminate(child: &mut Child, spec: &SpawnSpec) -> String {
    if let Ok(status) = tokio::time::timeout(spec.shutdown_grace, child.wait()).await {
        let how = describe_exit(&status);
        tracing::info!(exit = %how, "sidecar exited");
        return how;
    }
    if let Some(pid) = child.id() {
        tracing::warn!(
            grace_ms = spec.shutdown_grace.as_millis() as u64,
            "sidecar still running after the grace period: SIGTERM"
        );
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own
        // child, not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        if let Ok(status) = tokio::time::timeout(spec.term_grace, child.wait()).await {
            let how = describe_exit(&status);
            tracing::info!(exit = %how, "sidecar exited after SIGTERM");
            return how;
        }
    }
    tracing::warn!("sidecar ignored SIGTERM: SIGKILL");
    let _ = child.start_kill();
    describe_exit(&child.wait().await)
}

fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

fn jitter(d: Duration) -> Duration {
    // Up to +25%, from the clock's low bits: enough to spread restarts apart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let spread = d.as_millis() as u64 / 4;
    d + Duration::from_millis(if spread == 0 { 0 } else { nanos % spread })
}

async fn spawn(spec: &SpawnSpec, tail: &Arc<Mutex<VecDeque<String>>>) -> std::io::Result<Running> {
    let cmd = &spec.command;
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a terminal's Ctrl-C reaches the daemon,
        // which then shuts the sidecar down in order.
        .process_group(0);
    for key in &cmd.inherit_env {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
    command
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .env(env::SOCKET, &spec.socket)
        .env(env::TOKEN, &*spec.token)
        .env(env::NAME, spec.plugin)
        .env(env::PROTOCOL_VERSION, PROTOCOL_VERSION.to_string());
    if let Some(dir) = &cmd.current_dir {
        command.current_dir(dir);
    }
    set_parent_death_signal(&mut command);
    let mut child = spawn_from_stable_thread(command).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "spawning sidecar `{}` ({}): {e}",
                spec.plugin,
                cmd.program.display()
            ),
        )
    })?;
    tracing::info!(plugin = spec.plugin, pid = child.id(), program = %cmd.program.display(), "sidecar spawned");
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(tokio::spawn(forward(
            out,
            spec.plugin,
            "stdout",
            tail.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(tokio::spawn(forward(
            err,
            spec.plugin,
            "stderr",
            tail.clone(),
        )));
    }
    Ok(Running { child, forwarders })
}

/// Spawns `command` from one long-lived thread.
///
/// The kernel sends the parent-death signal when the *thread* that forked
/// the child exits, not the process. Runtime threads can come and go
/// (`block_in_place`, blocking-pool threads), so every sidecar is forked
/// from a thread that lives as long as the process.
async fn spawn_from_stable_thread(mut command: Command) -> std::io::Result<Child> {
    type Job = Box<dyn FnOnce() + Send>;
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pim-sidecar-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("starting the sidecar spawner thread");
        Mutex::new(tx)
    });
    let handle = tokio::runtime::Handle::current();
    // The caller awaits the fork and exec instead of blocking its runtime
    // thread on them.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _runtime = handle.enter();
        let _ = tx.send(command.spawn());
    });
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the sidecar spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the sidecar spawner thread is gone"))?
}

/// Asks the kernel to SIGKILL the child when the daemon dies, even by SIGKILL.
fn set_parent_death_signal(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit-free returns).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the daemon exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Level and message of a JSON log line (`{"level": "WARN", "message": …}`,
/// or tracing-subscriber's `{"level": …, "fields": {"message": …}}`).
fn json_line(line: &str) -> Option<(tracing::Level, String)> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let level = obj
        .get("level")
        .or_else(|| obj.get("severity"))
        .and_then(|l| l.as_str())
        .and_then(|l| l.to_ascii_uppercase().parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let message = obj
        .get("message")
        .or_else(|| obj.get("msg"))
        .or_else(|| obj.get("fields").and_then(|f| f.get("message")))
        .and_then(|m| m.as_str())
        .map_or_else(|| line.trim().to_owned(), str::to_owned);
    Some((level, message))
}

/// Splits a leading level word (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`,
/// as the Rust SDK and most loggers print) off a line.
fn level_of(line: &str) -> (tracing::Level, &str) {
    let trimmed = line.trim_start();
    for (word, level) in [
        ("ERROR", tracing::Level::ERROR),
        ("WARN", tracing::Level::WARN),
        ("INFO", tracing::Level::INFO),
        ("DEBUG", tracing::Level::DEBUG),
        ("TRACE", tracing::Level::TRACE),
    ] {
        if let Some(rest) = trimmed.strip_prefix(word) {
            if rest.is_empty() || rest.starts_with([' ', ':']) {
                return (level, rest.trim_start_matches([' ', ':']));
            }
        }
    }
    (tracing::Level::INFO, line)
}

/// Forwards each output line into `tracing`, at the line's own level, and
/// keeps the last few.
async fn forward(
    out: impl AsyncRead + Unpin,
    plugin: &'static str,
    stream: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parsed = if line.trim_start().starts_with('{') {
            json_line(&line)
        } else {
            None
        };
        let (level, msg) = match &parsed {
            Some((level, msg)) => (*level, msg.as_str()),
            None => level_of(&line),
        };
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "pim_sidecar::output", $lvl, plugin, stream, "{msg}")
            };
        }
        match level {
            tracing::Level::ERROR => emit!(tracing::Level::ERROR),
            tracing::Level::WARN => emit!(tracing::Level::WARN),
            tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
            tracing::Level::TRACE => emit!(tracing::Level::TRACE),
            _ => emit!(tracing::Level::INFO),
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::{json_line, level_of};
    use tracing::Level;

    #[test]
    fn output_lines_keep_their_level() {
        assert_eq!(level_of(" WARN slow peer"), (Level::WARN, "slow peer"));
        assert_eq!(level_of("ERROR: boom"), (Level::ERROR, "boom"));
        assert_eq!(level_of("DEBUG"), (Level::DEBUG, ""));
        assert_eq!(level_of("INFORMATION"), (Level::INFO, "INFORMATION"));
        assert_eq!(level_of("plain line"), (Level::INFO, "plain line"));
    }

    #[test]
    fn json_lines_keep_their_level() {
        assert_eq!(
            json_line(r#"{"level":"warn","message":"disk low"}"#),
            Some((Level::WARN, "disk low".into()))
        );
        assert_eq!(
            json_line(
                r#"{"timestamp":"t","level":"ERROR","fields":{"message":"boom"},"target":"x"}"#
            ),
            Some((Level::ERROR, "boom".into()))
        );
        assert_eq!(
            json_line(r#"{"msg":"hi"}"#),
            Some((Level::INFO, "hi".into()))
        );
        assert_eq!(json_line("{not json"), None);
    }
}
