//! Spawning and supervising a sidecar process: clean environment, log
//! forwarding, restart with backoff, the failed state and its retry,
//! replacement on request, and the kill order at shutdown.

use pim_plugin_proto::backoff::Backoff;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pim_plugin_proto::{env, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{CommandSpec, RestartPolicy};
use crate::end::{classify, EndReason, ProcessEnd};
use crate::output::forward;
use crate::queue::EventQueue;
use crate::sandbox::{spawn as sandboxed, Plan, Process};

/// What the supervisor has seen so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct SupervisorState {
    /// Processes spawned, the first included.
    pub(crate) spawns: u64,
    /// How the last process ended, if one has.
    pub(crate) last_exit: Option<String>,
    /// Whether the plugin is down for good, or until its retry: a crash
    /// loop, a refused Register, or a command that cannot be spawned.
    pub(crate) failed: bool,
    /// Why it failed, while it is failed.
    pub(crate) failure: Option<String>,
    /// The running process's id.
    pub(crate) pid: Option<u32>,
    /// Delays before the most recent restarts (at most 16).
    pub(crate) delays: Vec<Duration>,
    /// Restarts because the sidecar was stuck.
    pub(crate) stuck_restarts: u64,
    /// The seq it was last stuck on.
    pub(crate) last_stuck_seq: Option<u64>,
    /// Processes replaced on request ([`Supervisor::replace`]).
    pub(crate) replacements: u64,
    /// When a failed plugin is started again, if it will be.
    pub(crate) retry_at: Option<Instant>,
    /// Why the last process ended, typed, with its last output.
    pub(crate) last_end: Option<ProcessEnd>,
}

/// A handle to the supervising task.
#[derive(Debug)]
pub(crate) struct Supervisor {
    state: watch::Receiver<SupervisorState>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stop: CancellationToken,
    replace: mpsc::UnboundedSender<oneshot::Sender<std::io::Result<()>>>,
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
    /// The sandbox every process of this plugin runs in.
    pub(crate) plan: Arc<Plan>,
    /// Where every output line also goes, for the test kit.
    pub(crate) transcript: Option<Arc<crate::output::Transcript>>,
}

impl Supervisor {
    /// Starts supervising: the task spawns the first process at once.
    pub(crate) fn start(spec: SpawnSpec) -> Self {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (state_tx, state) = watch::channel(SupervisorState::default());
        let stop = CancellationToken::new();
        let (replace, replace_rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("sidecar", plugin = spec.plugin);
        let task = tokio::spawn(
            Supervision {
                spec,
                state: state_tx,
                tail: tail.clone(),
                stop: stop.clone(),
                replace: replace_rx,
                crashes: CrashWindow::default(),
            }
            .run()
            .instrument(span),
        );
        Self {
            state,
            tail,
            stop,
            replace,
            task: Mutex::new(Some(task)),
        }
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

    /// Marks the supervision as stopping: a process that exits from now on
    /// is not restarted. Call it before the Shutdown event is queued, so a
    /// sidecar that exits right after that event is never taken for a crash.
    pub(crate) fn begin_stop(&self) {
        self.stop.cancel();
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

    /// Replaces the running process (SIGTERM, `term_grace`, SIGKILL) with a
    /// new one at once, or starts a failed plugin again; the crash-loop
    /// count and the backoff start afresh. Returns once the new process is
    /// spawned.
    pub(crate) async fn replace(&self) -> std::io::Result<()> {
        let gone = || std::io::Error::other("the sidecar is stopping");
        if self.stop.is_cancelled() {
            return Err(gone());
        }
        let (tx, rx) = oneshot::channel();
        self.replace.send(tx).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Exits within the restart window, and the backoff before the next restart.
#[derive(Debug, Default)]
struct CrashWindow {
    exits: VecDeque<Instant>,
    /// Made from the policy at the first restart; `None` again after a
    /// process that ran a whole window.
    backoff: Option<Backoff>,
}

impl CrashWindow {
    /// Records an exit; `false` once more than `max_restarts` fall in the window.
    fn record(&mut self, policy: &RestartPolicy) -> bool {
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.exits.pop_front();
        }
        self.exits.len() <= policy.max_restarts as usize
    }

    /// A process that ran for a whole window was stable: the next crash
    /// starts the backoff afresh, at the initial delay.
    fn ran_for(&mut self, lifetime: Duration, policy: &RestartPolicy) {
        if lifetime >= policy.window {
            self.backoff = None;
        }
    }

    /// The delay before the next restart: the initial backoff, doubling up
    /// to the maximum.
    fn next_delay(&mut self, policy: &RestartPolicy) -> Duration {
        let backoff = self
            .backoff
            .get_or_insert_with(|| Backoff::new(policy.initial_backoff, policy.max_backoff));
        jitter(backoff.next_pause())
    }
}

/// The supervising task's state.
struct Supervision {
    spec: SpawnSpec,
    state: watch::Sender<SupervisorState>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stop: CancellationToken,
    replace: mpsc::UnboundedReceiver<oneshot::Sender<std::io::Result<()>>>,
    crashes: CrashWindow,
}

/// What the supervisor does after a process ended or could not start.
enum Next {
    /// Start a process now (a replacement, or a failed plugin's retry).
    SpawnNow(Option<oneshot::Sender<std::io::Result<()>>>),
    /// Supervision is over.
    Stop,
}

impl Supervision {
    async fn run(mut self) {
        let mut reply: Option<oneshot::Sender<std::io::Result<()>>> = None;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let spawned = spawn(&self.spec, &self.tail).await;
            let mut running = match spawned {
                Ok(running) => {
                    self.state.send_modify(|s| {
                        s.spawns += 1;
                        s.pid = running.child.id();
                        s.failed = false;
                        s.failure = None;
                        s.retry_at = None;
                    });
                    if let Some(reply) = reply.take() {
                        let _: Result<_, _> = reply.send(Ok(()));
                    }
                    running
                }
                Err(e) => {
                    let why = e.to_string();
                    if let Some(reply) = reply.take() {
                        let _: Result<_, _> = reply.send(Err(e));
                    }
                    match self.fail(why).await {
                        Next::SpawnNow(r) => {
                            reply = r;
                            continue;
                        }
                        Next::Stop => return,
                    }
                }
            };
            match self.watch(&mut running).await {
                Next::SpawnNow(r) => reply = r,
                Next::Stop => return,
            }
        }
    }

    /// Watches one process until it ends, is replaced, or supervision stops.
    async fn watch(&mut self, running: &mut Running) -> Next {
        let (status, reason) = tokio::select! {
            // Stopping wins over an exit seen at the same moment: a sidecar
            // that exits on its Shutdown event is not restarted.
            biased;
            () = self.stop.cancelled() => {
                let status = terminate(&mut running.child, &self.spec).await;
                self.ended(running, &status, EndReason::Stopped).await;
                return Next::Stop;
            }
            Some(reply) = self.replace.recv() => {
                tracing::info!("replacing the sidecar process");
                let status = signal_then_kill(&mut running.child, self.spec.term_grace).await;
                self.crashes = CrashWindow::default();
                self.ended(running, &status, EndReason::Replaced).await;
                self.state.send_modify(|s| s.replacements += 1);
                return Next::SpawnNow(Some(reply));
            }
            status = running.child.wait() => {
                let oom = self.spec.plan.oom_kills() > running.oom_kills_before;
                let reason = classify(&status, oom, self.spec.plan.memory_limit());
                (status, reason)
            }
            seq = stuck(&self.spec) => {
                tracing::error!(
                    seq,
                    timeout_ms = self.spec.stuck_timeout.unwrap_or_default().as_millis() as u64,
                    "sidecar stuck: no ack progress on seq {seq}; killing it to restart"
                );
                self.state.send_modify(|s| {
                    s.stuck_restarts += 1;
                    s.last_stuck_seq = Some(seq);
                });
                (running.child.kill().await, EndReason::Stuck { seq })
            }
        };
        let end = self.ended(running, &status, reason.clone()).await;
        if self.stop.is_cancelled() {
            tracing::info!(exit = %end.status, "sidecar exited");
            return Next::Stop;
        }
        if end.last_output.is_empty() {
            tracing::warn!(exit = %end.status, "sidecar process ended: {reason}");
        } else {
            tracing::warn!(
                exit = %end.status,
                "sidecar process ended: {reason}; its last output:\n  {}",
                end.last_output.join("\n  ")
            );
        }
        if reason == EndReason::Refused {
            return self
                .fail(format!(
                    "the host refused the sidecar's Register ({}); it is not restarted until its configuration changes",
                    end.status
                ))
                .await;
        }
        self.crashes.ran_for(end.ran_for, &self.spec.restart);
        if !self.crashes.record(&self.spec.restart) {
            return self
                .fail(format!(
                    "crash loop: more than {} restarts within {:?} (last: {reason})",
                    self.spec.restart.max_restarts, self.spec.restart.window
                ))
                .await;
        }
        let delay = self.crashes.next_delay(&self.spec.restart);
        tracing::info!(delay_ms = delay.as_millis() as u64, "restarting sidecar");
        self.state.send_modify(|s| {
            if s.delays.len() == 16 {
                s.delays.remove(0);
            }
            s.delays.push(delay);
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => Next::SpawnNow(None),
            () = self.stop.cancelled() => Next::Stop,
            Some(reply) = self.replace.recv() => {
                self.crashes = CrashWindow::default();
                Next::SpawnNow(Some(reply))
            }
        }
    }

    /// Records a process's end: drains its output, kills what it left
    /// behind (its process group, its cgroup), and publishes why it ended.
    async fn ended(
        &mut self,
        running: &mut Running,
        status: &std::io::Result<ExitStatus>,
        reason: EndReason,
    ) -> ProcessEnd {
        let plan = self.spec.plan.clone();
        let _ = tokio::task::spawn_blocking(move || plan.kill_leftovers()).await;
        running.drain().await;
        let end = ProcessEnd {
            reason,
            pid: running.pid,
            ran_for: running.started.elapsed(),
            status: describe_exit(status),
            last_output: self
                .tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        };
        self.state.send_modify(|s| {
            s.pid = None;
            s.last_exit = Some(end.status.clone());
            s.last_end = Some(end.clone());
        });
        end
    }

    /// Marks the plugin failed, logs why once with the sidecar's last
    /// output, and waits for a retry: the policy's `retry_failed_after`, or
    /// a replacement on request.
    async fn fail(&mut self, why: String) -> Next {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect::<Vec<_>>();
        let retry = self.spec.restart.retry_failed_after;
        let retry_note =
            retry.map_or_else(|| "not retried".to_owned(), |d| format!("retried in {d:?}"));
        if tail.is_empty() {
            tracing::error!("plugin marked failed ({retry_note}): {why}");
        } else {
            tracing::error!(
                "plugin marked failed ({retry_note}): {why}; its last output:\n  {}",
                tail.join("\n  ")
            );
        }
        self.state.send_modify(|s| {
            s.failed = true;
            s.failure = Some(why);
            s.pid = None;
            s.retry_at = retry.and_then(|d| Instant::now().checked_add(d));
        });
        let retry_sleep = async {
            match retry {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.stop.cancelled() => Next::Stop,
            Some(reply) = self.replace.recv() => {
                self.crashes = CrashWindow::default();
                Next::SpawnNow(Some(reply))
            }
            () = retry_sleep => {
                tracing::info!("retrying the failed plugin");
                self.crashes = CrashWindow::default();
                Next::SpawnNow(None)
            }
        }
    }
}

/// A running child and the tasks forwarding its output.
struct Running {
    child: Process,
    pid: u32,
    started: Instant,
    /// The cgroup's OOM kills before this process started.
    oom_kills_before: u64,
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

/// Resolves with the stuck seq once the queue has had events pending and
/// no progress for the stuck timeout; never when the timeout is disabled.
///
/// It sleeps until the moment the oldest pending event would be stuck, and,
/// while nothing is pending, until an event arrives: an idle plugin costs
/// the daemon no timer wake-ups. A process gets the whole timeout from its
/// start, whatever its predecessor left pending.
async fn stuck(spec: &SpawnSpec) -> u64 {
    let Some(timeout) = spec.stuck_timeout else {
        return std::future::pending().await;
    };
    let started = Instant::now();
    loop {
        match spec.queue.stalled() {
            None => spec.queue.until_pending().await,
            Some((seq, idle)) => {
                let idle = idle.min(started.elapsed());
                if idle >= timeout {
                    return seq;
                }
                tokio::time::sleep(timeout - idle).await;
            }
        }
    }
}

/// The kill order: wait for a voluntary exit, SIGTERM, wait, SIGKILL.
async fn terminate(child: &mut Process, spec: &SpawnSpec) -> std::io::Result<ExitStatus> {
    if let Ok(status) = tokio::time::timeout(spec.shutdown_grace, child.wait()).await {
        tracing::info!(exit = %describe_exit(&status), "sidecar exited");
        return status;
    }
    tracing::warn!(
        grace_ms = spec.shutdown_grace.as_millis() as u64,
        "sidecar still running after the grace period: SIGTERM"
    );
    signal_then_kill(child, spec.term_grace).await
}

/// SIGTERM, up to `term_grace` for the process to exit, then SIGKILL.
async fn signal_then_kill(
    child: &mut Process,
    term_grace: Duration,
) -> std::io::Result<ExitStatus> {
    if child.signal(libc::SIGTERM).is_ok() {
        if let Ok(status) = tokio::time::timeout(term_grace, child.wait()).await {
            tracing::info!(exit = %describe_exit(&status), "sidecar exited after SIGTERM");
            return status;
        }
    }
    tracing::warn!("sidecar ignored SIGTERM: SIGKILL");
    child.kill().await
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
    let spread = u64::try_from(d.as_millis() / 4).unwrap_or(u64::MAX);
    d.saturating_add(Duration::from_millis(if spread == 0 {
        0
    } else {
        nanos % spread
    }))
}

/// The sidecar's environment: the configured and inherited variables,
/// then the `PIM_PLUGIN_*` ones (the token's descriptor, not the token,
/// unless `token_env` asks for it).
fn environment(spec: &SpawnSpec) -> Vec<(OsString, OsString)> {
    let cmd = &spec.command;
    let mut vars: Vec<(OsString, OsString)> = Vec::new();
    for key in &cmd.inherit_env {
        if let Some(value) = std::env::var_os(key) {
            vars.push((key.clone(), value));
        }
    }
    vars.extend(cmd.env.iter().cloned());
    vars.push((env::SOCKET.into(), spec.socket.clone().into()));
    vars.push((env::TOKEN_FD.into(), sandboxed::TOKEN_FD.to_string().into()));
    if spec.plan.token_env {
        vars.push((env::TOKEN.into(), spec.token.to_string().into()));
    }
    vars.push((env::NAME.into(), spec.plugin.into()));
    vars.push((
        env::PROTOCOL_VERSION.into(),
        PROTOCOL_VERSION.to_string().into(),
    ));
    // A later variable of the same name wins, as in a shell.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<_> = vars
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    out.reverse();
    out
}

/// Prepares and starts one sandboxed process (on the spawner thread), then
/// wires its output into the log and the tail.
async fn spawn(spec: &SpawnSpec, tail: &Arc<Mutex<VecDeque<String>>>) -> std::io::Result<Running> {
    let failed = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!(
                "spawning sidecar `{}` ({}): {e}",
                spec.plugin,
                spec.command.program.display()
            ),
        )
    };
    let job_spec = spec.clone();
    let oom_kills_before = spec.plan.oom_kills();
    let started = on_spawner_thread(move || start_process(&job_spec))
        .await
        .map_err(failed)?;
    let child = Process::new(started.pid, started.pidfd).map_err(failed)?;
    tracing::info!(pid = started.pid, program = %spec.command.program.display(), "sidecar spawned");
    let mut forwarders = Vec::new();
    for (fd, stream) in [(started.stdout, "stdout"), (started.stderr, "stderr")] {
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(failed)?;
        forwarders.push(tokio::spawn(
            forward(pipe, stream, tail.clone(), spec.transcript.clone()).in_current_span(),
        ));
    }
    Ok(Running {
        child,
        pid: started.pid,
        started: Instant::now(),
        oom_kills_before,
        forwarders,
    })
}

/// Everything blocking about a spawn: the Landlock ruleset, the cgroup
/// files, the prepared child, the clone.
fn start_process(spec: &SpawnSpec) -> std::io::Result<sandboxed::Started> {
    let plan = &spec.plan;
    let (program, interpreter) = plan.program()?;
    let landlock = plan.landlock_ruleset(&program, interpreter.as_deref())?;
    let prepared = sandboxed::prepare(sandboxed::Request {
        program: &program,
        args: &spec.command.args,
        env: environment(spec),
        cwd: spec.command.current_dir.as_deref(),
        token: &spec.token,
        identity: plan.identity,
        rlimits: plan.rlimits.clone(),
        cgroup_files: plan.cgroup_files()?,
        landlock: landlock.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        seccomp: &plan.seccomp,
        watchdog: crate::watchdog::prepare(spec.shutdown_grace, spec.term_grace)?,
    })?;
    let started = sandboxed::start(prepared);
    drop(landlock);
    started
}

/// Runs `job` on one long-lived thread: the daemon's runtime threads never
/// block in a clone, and the parent-death signal (the fallback without a
/// watchdog) is tied to a thread that lives as long as the daemon.
async fn on_spawner_thread<T: Send + 'static>(
    job: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    type Job = Box<dyn FnOnce() + Send>;
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        // A thread that cannot start leaves the receiver to drop: every
        // spawn then fails with the error below instead of panicking.
        let _ = std::thread::Builder::new()
            .name("pim-sidecar-spawner".into())
            .spawn(move || {
                for job in rx {
                    // A job that panics must not end the thread: the
                    // parent-death signal of sidecars started without a
                    // watchdog is tied to it. Its caller sees the error.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
        Mutex::new(tx)
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(job());
    });
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the sidecar spawner thread is gone"))?;
    rx.await.map_err(|_| {
        std::io::Error::other("the spawn failed inside the sidecar spawner thread (it panicked)")
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueLimits;

    fn spec() -> SpawnSpec {
        SpawnSpec {
            plugin: "quick",
            command: CommandSpec::new("/bin/true"),
            socket: "/nonexistent/quick.sock".into(),
            token: "t".into(),
            restart: RestartPolicy::default(),
            queue: Arc::new(EventQueue::new(QueueLimits::default())),
            stuck_timeout: None,
            shutdown_grace: Duration::from_secs(1),
            term_grace: Duration::from_secs(1),
            plan: Arc::new(
                Plan::new(
                    "quick",
                    std::path::Path::new("/bin/true"),
                    crate::sandbox::resolve_identity(None, None).unwrap(),
                    &crate::Sandbox::off(),
                    std::path::Path::new("/tmp"),
                )
                .unwrap(),
            ),
            transcript: None,
        }
    }

    /// The child between clone and exec allocates nothing and takes no
    /// lock: 200 sandboxed spawns while two threads allocate as fast as
    /// they can all finish, and no allocation is made by another process.
    #[test]
    fn spawning_is_allocation_free_while_other_threads_allocate() {
        let plan = |user: Option<&str>| {
            Arc::new(
                Plan::new(
                    "forksafe",
                    std::path::Path::new("/bin/true"),
                    crate::sandbox::resolve_identity(user, None).unwrap(),
                    &crate::Sandbox::default(),
                    std::path::Path::new("/tmp"),
                )
                .unwrap(),
            )
        };
        let mut spec = spec();
        spec.plan = plan(None);
        // As root, every step runs: the uid switch, securebits, the
        // bounding set, the cgroup.
        // SAFETY: geteuid cannot fail.
        let mut switched = spec.clone();
        if unsafe { libc::geteuid() } == 0 {
            switched.plan = plan(Some("61001"));
        }
        // And a child that fails at a stage and reports it.
        let mut failing = spec.clone();
        failing.command.current_dir = Some("/nonexistent/dir".into());
        crate::alloc_probe::watch();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..2)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let v: Vec<u64> = (0..(64 + i * 512)).collect();
                        n += v.len() as u64;
                        drop(std::hint::black_box(v));
                    }
                    n
                })
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawner = std::thread::spawn(move || {
            for i in 0..200 {
                let spec = if i % 2 == 0 { &spec } else { &switched };
                let started = start_process(spec).expect("spawn");
                super::sandboxed::reap_blocking(&started.pidfd);
                if i % 20 == 0 {
                    let err = start_process(&failing).expect_err("a bad working directory");
                    assert!(
                        err.to_string()
                            .contains("changing to the working directory"),
                        "{err}"
                    );
                }
            }
            spec.plan.remove_cgroup();
            switched.plan.remove_cgroup();
            let _ = tx.send(());
        });
        let finished = rx.recv_timeout(Duration::from_secs(120));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let allocated: u64 = churn.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(
            finished.is_ok(),
            "200 spawns did not finish in 120 s: a child deadlocked"
        );
        spawner.join().unwrap();
        assert!(allocated > 0);
        assert_eq!(
            crate::alloc_probe::foreign_allocations(),
            0,
            "a spawned child allocated before its exec"
        );
    }

    #[test]
    fn the_backoff_starts_afresh_after_a_process_that_ran_a_whole_window() {
        let policy = RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            ..RestartPolicy::default()
        };
        let mut crashes = CrashWindow::default();
        // The delay is the backoff plus up to 25% jitter.
        let next = |crashes: &mut CrashWindow, expected_ms: u64| {
            let d = crashes.next_delay(&policy).as_millis() as u64;
            assert!(
                (expected_ms..expected_ms + expected_ms / 4 + 1).contains(&d),
                "{d} ms, expected {expected_ms} ms + jitter"
            );
        };
        next(&mut crashes, 100);
        next(&mut crashes, 200);
        next(&mut crashes, 400);
        // A short life keeps the backoff growing.
        crashes.ran_for(Duration::from_secs(5), &policy);
        next(&mut crashes, 800);
        // A process that ran a whole window resets it.
        crashes.ran_for(policy.window, &policy);
        next(&mut crashes, 100);
    }

    /// The stuck check waits while nothing is pending, and fires once the
    /// timeout has passed without progress after an event arrived, not
    /// before.
    #[tokio::test(flavor = "current_thread")]
    async fn the_stuck_check_waits_while_idle_and_fires_on_time() {
        let timeout = Duration::from_millis(300);
        let mut spec = spec();
        spec.stuck_timeout = Some(timeout);
        let spec = Arc::new(spec);
        let check = tokio::spawn({
            let spec = spec.clone();
            async move { stuck(&spec).await }
        });
        // Idle for longer than the timeout: nothing pending, nothing found.
        tokio::time::sleep(3 * timeout).await;
        assert!(!check.is_finished());
        let started = Instant::now();
        let pushed = spec
            .queue
            .push(pim_plugin_proto::convert::PluginEvent::PeerForgotten {
                node: pim_core::NodeId::from_bytes([1; 16]),
            });
        let seq = tokio::time::timeout(Duration::from_secs(10), check)
            .await
            .expect("the stuck check fires")
            .unwrap();
        assert_eq!(seq, pushed.seq);
        let took = started.elapsed();
        assert!(took >= timeout, "{took:?}");
        // The event is still pending and old: a check for a new process
        // still gives that process the whole timeout.
        let started = Instant::now();
        let again = tokio::time::timeout(Duration::from_secs(10), stuck(&spec))
            .await
            .expect("the stuck check fires again");
        assert_eq!(again, pushed.seq);
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    }

    /// A process that exits as the stop begins (say, on its Shutdown event)
    /// is never taken for a crash, whichever the supervisor sees first.
    #[tokio::test(flavor = "current_thread")]
    async fn an_exit_seen_together_with_the_stop_is_not_a_crash() {
        for round in 0..20 {
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let (state, state_rx) = watch::channel(SupervisorState::default());
            let (_replace_tx, replace) = mpsc::unbounded_channel();
            let mut supervision = Supervision {
                spec: spec(),
                state,
                tail: tail.clone(),
                stop: CancellationToken::new(),
                replace,
                crashes: CrashWindow::default(),
            };
            let mut running = spawn(&supervision.spec, &tail).await.unwrap();
            // Let the process exit and the runtime's driver notice it...
            let pid = running.child.id().unwrap();
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            }) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            // ...and only then begin the stop: both are ready at once.
            supervision.stop.cancel();
            assert!(matches!(supervision.watch(&mut running).await, Next::Stop));
            let state = state_rx.borrow().clone();
            assert!(
                state.delays.is_empty(),
                "round {round}: restarted: {state:?}"
            );
            assert_eq!(state.last_exit.as_deref(), Some("exit status 0"));
        }
    }
}
