//! `SidecarPlugin`: the `pim_plugin::DaemonPlugin` that forwards to a sidecar.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::{DaemonPlugin, PluginContext};
use pim_plugin_proto::convert::PluginEvent;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, DataDir, Launch, SidecarConfig};
use crate::end::ProcessEnd;
use crate::host::Host;
use crate::queue::{intern_kind, EventQueue, QueueStats};
use crate::sandbox::{self, SandboxReport};
use crate::supervisor::{SpawnSpec, Supervisor};
use crate::{kinds, secret, server, socket};

/// A daemon-side plugin whose implementation runs in a separate process.
///
/// Hand it to the daemon as `Arc<dyn DaemonPlugin>` like any in-process
/// plugin. `handle_payload` and `on_peer_forgotten` only enqueue, so they
/// never wait on the sidecar; the sidecar receives the events in order over
/// the `Events` stream and calls the daemon's ports back over gRPC.
///
/// A daemon that hosts an echo sidecar, running as its own user with a
/// tighter memory limit, and reports on it:
///
/// ```no_run
/// use std::sync::Arc;
///
/// use pim_plugin::{DaemonPlugin, PluginContext};
/// use pim_plugin_bridge::{CommandSpec, SidecarConfig, SidecarPlugin};
///
/// # async fn daemon(ctx: PluginContext) -> anyhow::Result<()> {
/// let mut config = SidecarConfig::spawn(
///     "echo",
///     ["echo.ping", "echo.pong"],
///     "/run/pim/plugins",
///     CommandSpec::new("/usr/lib/pim/echo-sidecar").inherit("RUST_LOG"),
/// );
/// config.user = Some("pim-echo".into());
/// config.sandbox.limits.memory = Some(64 << 20);
/// let echo = Arc::new(SidecarPlugin::new(config)?);
///
/// // What the daemon does with every plugin:
/// echo.clone().start(ctx).await?;
/// let stats = echo.stats();
/// println!("echo: pid {:?}, {} restarts, last end {:?}", echo.pid(), stats.restarts, stats.last_end);
/// echo.shutdown().await;
/// # Ok(()) }
/// ```
pub struct SidecarPlugin {
    /// Identifies this plugin's claims on payload kinds.
    id: u64,
    name: &'static str,
    kinds: &'static [&'static str],
    config: SidecarConfig,
    token: Arc<str>,
    queue: Arc<EventQueue>,
    running: Mutex<Option<Arc<Running>>>,
    /// Set by the first `start`: a plugin starts once.
    started: std::sync::atomic::AtomicBool,
    /// Why an optional plugin could not even serve its socket.
    start_failure: Mutex<Option<String>>,
    stopped: tokio::sync::OnceCell<()>,
    /// Every output line, when the test kit asked for it before `start`.
    transcript: OnceLock<Arc<crate::output::Transcript>>,
}

impl Drop for SidecarPlugin {
    fn drop(&mut self) {
        // A plugin dropped without `shutdown` gives its kinds up all the same.
        kinds::release(self.id);
    }
}

impl std::fmt::Debug for SidecarPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarPlugin")
            .field("name", &self.name)
            .field("kinds", &self.kinds)
            .field("socket", &self.config.socket_path())
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Running {
    host: Arc<Host>,
    plan: Option<Arc<sandbox::Plan>>,
    supervisor: Option<Supervisor>,
    server: Mutex<Option<JoinHandle<()>>>,
    stopping: CancellationToken,
    socket: PathBuf,
}

/// Per-plugin figures, a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SidecarStats {
    /// Queue counters (delivered, acked, replayed, dropped, depth, bytes).
    pub queue: QueueStats,
    /// Times the sidecar process was restarted.
    pub restarts: u64,
    /// Whether a sidecar holds an Events stream open now.
    pub connected: bool,
    /// Whether the plugin is failed: its sidecar could not be spawned, its
    /// Register was refused, or it crashed in a loop. It is retried after
    /// `restart.retry_failed_after`, or by [`SidecarPlugin::restart`].
    pub failed: bool,
    /// Why it failed, while it is failed.
    pub failure: Option<String>,
    /// Whether the configuration marks the plugin required (a failure to
    /// start then fails `start()`), or optional (the daemon runs on).
    pub required: bool,
    /// Processes replaced by [`SidecarPlugin::restart`].
    pub replacements: u64,
    /// For a failed plugin: the time until it is started again
    /// (`restart.retry_failed_after`); `None` when it is not failed, or
    /// when it waits for [`SidecarPlugin::restart`].
    pub next_attempt_in: Option<Duration>,
    /// Time since the ack position last moved.
    pub last_ack_age: Duration,
    /// How the last sidecar process ended, if one has.
    pub last_exit: Option<String>,
    /// The delays before the most recent restarts, oldest first (at most 16).
    pub restart_delays: Vec<Duration>,
    /// Restarts because the sidecar made no progress for `stuck_timeout`.
    pub stuck_restarts: u64,
    /// The seq the sidecar was last found stuck on.
    pub last_stuck_seq: Option<u64>,
    /// Why the last sidecar process ended, typed, with its last output.
    pub last_end: Option<ProcessEnd>,
    /// What the kernel enforces on a spawned sidecar (`None` for an
    /// external one, or before `start`).
    pub sandbox: Option<SandboxReport>,
}

impl SidecarPlugin {
    /// A plugin for `config`, checked field by field.
    ///
    /// The name and kinds are leaked to `'static`, as `DaemonPlugin`
    /// requires; create one `SidecarPlugin` per plugin per daemon.
    pub fn new(config: SidecarConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let name: &'static str = Box::leak(config.name.clone().into_boxed_str());
        let kinds: Vec<&'static str> = config
            .payload_kinds
            .iter()
            .map(|k| &*Box::leak(k.clone().into_boxed_str()))
            .collect();
        Ok(Self {
            id: kinds::claimant_id(),
            name,
            kinds: Box::leak(kinds.into_boxed_slice()),
            queue: Arc::new(EventQueue::with_budget(
                config.queue,
                config.queue_budget.clone(),
            )),
            token: secret::new_token().into(),
            config,
            running: Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
            start_failure: Mutex::new(None),
            stopped: tokio::sync::OnceCell::new(),
            transcript: OnceLock::new(),
        })
    }

    /// The socket this plugin serves on.
    pub fn socket_path(&self) -> PathBuf {
        self.config.socket_path()
    }

    /// The secret token a sidecar must present. A spawned sidecar reads it
    /// from the inherited descriptor that `PIM_PLUGIN_TOKEN_FD` names (and
    /// from `PIM_PLUGIN_TOKEN` with `sandbox.token_env`); for an external one the host writes it to
    /// [`SidecarConfig::token_path`] (mode 0600) at start.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Keeps every line the plugin's processes print from now on (call
    /// before `start`), for [`crate::testkit::FakeHost`] to show.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn transcript(&self) -> Arc<crate::output::Transcript> {
        self.transcript.get_or_init(Arc::default).clone()
    }

    /// Ends the sidecar's Events stream (`UNAVAILABLE`); see
    /// [`crate::testkit::FakeHost::interrupt_stream`].
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn interrupt_stream(&self) -> bool {
        self.running().is_some_and(|r| r.host.interrupt_stream())
    }

    /// Stops serving at once, as a daemon that dies does: no Shutdown event;
    /// the streams end, the socket and token file are removed. A later
    /// `shutdown()` does nothing. See [`crate::testkit::FakeHost::crash`].
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) async fn crash(&self) {
        self.stopped
            .get_or_init(|| async {
                let Some(running) = self.running() else {
                    return;
                };
                self.stop_serving(&running, Duration::ZERO).await;
            })
            .await;
    }

    /// Queues an event sent as a kind the client does not know; see
    /// [`crate::testkit::FakeHost::inject_unknown_event`].
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn inject_unknown_event(&self) -> Option<u64> {
        let running = self.running()?;
        // The seq is marked before the event exists, so no stream can send
        // it with its kind first.
        let seq = self.queue.last_seq() + 1;
        running
            .host
            .unknown_seq
            .store(seq, std::sync::atomic::Ordering::SeqCst);
        let pushed = self.queue.push(PluginEvent::Payload {
            src: NodeId::from_bytes([0; 16]),
            kind: intern_kind(self.kinds[0], self.kinds),
            body: Bytes::new(),
        });
        Some(pushed.seq)
    }

    /// Answers Acks without moving the ack position while `hold` is set;
    /// see [`crate::testkit::FakeHost::hold_acks`].
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn hold_acks(&self, hold: bool) {
        if let Some(r) = self.running() {
            r.host
                .acks_held
                .store(hold, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The sidecar process's id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.running()?.supervisor.as_ref()?.state().pid
    }

    /// The newest event's sequence number and the acked position, read
    /// without taking the queue's lock (cheap enough to poll; `stats` gives
    /// everything).
    pub fn progress(&self) -> (u64, u64) {
        (self.queue.last_seq(), self.queue.acked())
    }

    /// Current figures.
    pub fn stats(&self) -> SidecarStats {
        let running = self.running();
        let sup = running
            .as_ref()
            .and_then(|r| r.supervisor.as_ref())
            .map(Supervisor::state);
        let start_failure = self
            .start_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        SidecarStats {
            queue: self.queue.stats(),
            restarts: sup.as_ref().map_or(0, |s| s.spawns.saturating_sub(1)),
            connected: running.as_ref().is_some_and(|r| r.host.connected()),
            failed: start_failure.is_some() || sup.as_ref().is_some_and(|s| s.failed),
            failure: start_failure.or_else(|| sup.as_ref().and_then(|s| s.failure.clone())),
            required: self.config.required,
            replacements: sup.as_ref().map_or(0, |s| s.replacements),
            next_attempt_in: sup
                .as_ref()
                .and_then(|s| s.retry_at)
                .map(|at| at.saturating_duration_since(std::time::Instant::now())),
            last_ack_age: self.queue.last_ack_age(),
            last_exit: sup.as_ref().and_then(|s| s.last_exit.clone()),
            restart_delays: sup.as_ref().map(|s| s.delays.clone()).unwrap_or_default(),
            stuck_restarts: sup.as_ref().map_or(0, |s| s.stuck_restarts),
            last_stuck_seq: sup.as_ref().and_then(|s| s.last_stuck_seq),
            last_end: sup.as_ref().and_then(|s| s.last_end.clone()),
            sandbox: running
                .as_ref()
                .and_then(|r| r.plan.as_ref())
                .map(|p| p.report.clone()),
        }
    }

    fn running(&self) -> Option<Arc<Running>> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the sidecar registered more than `since` times, the
    /// supervisor marked it failed, or `startup_timeout` ran out; the error
    /// says what the process did and shows its last output.
    async fn wait_registered(&self, running: &Running, since: u64) -> anyhow::Result<()> {
        let mut registrations = running.host.registrations();
        let mut sup_state = running.supervisor.as_ref().map(Supervisor::watch);
        let wait = async {
            loop {
                // Registered, and the supervisor has recorded the process
                // (a fast sidecar can register before it did).
                if *registrations.borrow_and_update() > since
                    && sup_state
                        .as_mut()
                        .is_none_or(|s| s.borrow_and_update().pid.is_some())
                {
                    return true;
                }
                if sup_state.as_ref().is_some_and(|s| s.borrow().failed) {
                    return false;
                }
                tokio::select! {
                    r = registrations.changed() => if r.is_err() { return false },
                    r = async {
                        match &mut sup_state {
                            Some(s) => s.changed().await,
                            None => std::future::pending().await,
                        }
                    } => if r.is_err() { return false },
                }
            }
        };
        let timeout = self.config.startup_timeout;
        let mut msg = match tokio::time::timeout(timeout, wait).await {
            Ok(true) => return Ok(()),
            Ok(false) => {
                let why = running
                    .supervisor
                    .as_ref()
                    .and_then(|s| s.state().failure)
                    .unwrap_or_else(|| "its supervisor gave up".into());
                format!("sidecar `{}` failed to start: {why}", self.name)
            }
            Err(_) => format!(
                "sidecar `{}` did not register within {timeout:?} on {}",
                self.name,
                running.socket.display()
            ),
        };
        if let Some(sup) = &running.supervisor {
            let state = sup.state();
            match (&state.last_exit, state.pid) {
                (Some(exit), _) => msg.push_str(&format!(
                    "; the process ended ({exit}) after {} start(s)",
                    state.spawns
                )),
                (None, Some(pid)) => msg.push_str(&format!(
                    "; the process (pid {pid}) is running but never called Register: is it a pim sidecar, and does it read PIM_PLUGIN_SOCKET?"
                )),
                (None, None) => {}
            }
            let tail = sup.tail();
            if !tail.is_empty() {
                msg.push_str(&format!("; its last output:\n  {}", tail.join("\n  ")));
            }
        }
        anyhow::bail!(msg)
    }

    /// Replaces the running sidecar process with a new one, for example after
    /// its binary was upgraded: the old process gets SIGTERM (and SIGKILL
    /// after `term_grace`), the new one is spawned at once and resumes after
    /// the last acked event, so no event is lost (events the old process
    /// handled but had not acked yet are delivered again). A failed plugin
    /// is started again. Returns once the new process registered (bounded
    /// by `startup_timeout`), or at once without `wait_for_register`.
    pub async fn restart(&self) -> anyhow::Result<()> {
        let Some(running) = self.running() else {
            anyhow::bail!("sidecar plugin `{}` is not started", self.name);
        };
        let Some(sup) = &running.supervisor else {
            anyhow::bail!(
                "sidecar plugin `{}` is external: restart its process where it runs; it resumes after the last ack",
                self.name
            );
        };
        let since = *running.host.registrations().borrow();
        sup.replace().await?;
        if self.config.wait_for_register {
            self.wait_registered(&running, since).await?;
        }
        tracing::info!(plugin = self.name, "sidecar process replaced");
        Ok(())
    }

    /// Prepares the directories, binds the socket, serves it and starts the
    /// supervisor.
    fn serve(&self, ctx: &PluginContext) -> anyhow::Result<Arc<Running>> {
        // Every path a sidecar is handed is absolute: it may run in another
        // directory than the daemon.
        let socket_path = std::path::absolute(self.config.socket_path())?;
        let spawned = matches!(self.config.launch, Launch::Spawn(_));
        let identity = match spawned {
            true => {
                sandbox::resolve_identity(self.config.user.as_deref(), self.config.group.as_deref())
                    .map_err(|e| anyhow::anyhow!("sidecar `{}`: {e}", self.name))?
            }
            false => sandbox::resolve_identity(None, None).map_err(anyhow::Error::msg)?,
        };
        // A sidecar of another uid must reach its socket by name: the
        // directory opens to search (never to listing), the socket is its.
        let owner = identity.switch.then_some((identity.uid, identity.gid));
        socket::prepare_dir(&self.config.socket_dir, owner.is_some())?;
        let data_dir = std::path::absolute(self.config.data_dir.resolve(&ctx.data_dir, self.name))?;
        match &self.config.data_dir {
            DataDir::Own => socket::prepare_data_dir(&data_dir, true, owner)?,
            DataDir::Path(_) => socket::prepare_data_dir(&data_dir, false, owner)?,
            DataDir::Daemon => {}
        }
        if let Some((uid, _)) = owner {
            sandbox::check_reachable(&socket_path, uid, identity.gid)
                .map_err(|e| anyhow::anyhow!("sidecar `{}`: socket_dir: {e}", self.name))?;
        }
        let plan = match &self.config.launch {
            Launch::Spawn(command) => Some(Arc::new(
                sandbox::Plan::new(
                    self.name,
                    &command.program,
                    identity,
                    &self.config.sandbox,
                    &data_dir,
                )
                .map_err(|e| anyhow::anyhow!("sidecar `{}`: {e}", self.name))?,
            )),
            Launch::External => None,
        };
        let listener = socket::bind(&socket_path, owner)?;
        if matches!(self.config.launch, Launch::External) {
            socket::write_token(&self.config.token_path(), &self.token)?;
        }
        let mut config = self.config.clone();
        if config.allowed_uids.is_empty() {
            config.allowed_uids = vec![identity.uid];
        }
        let stopping = CancellationToken::new();
        let host = Arc::new(Host::new(
            self.name,
            self.kinds,
            config,
            ctx.clone(),
            data_dir,
            self.queue.clone(),
            stopping.clone(),
        ));
        let server = server::serve(host.clone(), self.token.clone(), listener, stopping.clone())
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&socket_path);
            })?;
        tracing::info!(plugin = self.name, socket = %socket_path.display(), "serving sidecar socket");
        let supervisor = match (&self.config.launch, &plan) {
            (Launch::Spawn(command), Some(plan)) => Some(Supervisor::start(SpawnSpec {
                plugin: self.name,
                command: command.clone(),
                socket: socket_path.clone(),
                token: self.token.clone(),
                restart: self.config.restart,
                queue: self.queue.clone(),
                stuck_timeout: self.config.stuck_timeout,
                shutdown_grace: self.config.shutdown_grace,
                term_grace: self.config.term_grace,
                plan: plan.clone(),
                transcript: self.transcript.get().cloned(),
            })),
            _ => None,
        };
        if let Some(sup) = &supervisor {
            // The socket never evicts the sidecar's own connections.
            let (mut state, pid) = (sup.watch(), host.sidecar_pid.clone());
            tokio::spawn(async move {
                loop {
                    let now = state.borrow_and_update().pid.unwrap_or(0);
                    pid.store(now, std::sync::atomic::Ordering::Relaxed);
                    if state.changed().await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Arc::new(Running {
            host,
            plan,
            supervisor,
            server: Mutex::new(Some(server)),
            stopping,
            socket: socket_path,
        }))
    }

    /// Ends the streams, gives the server `grace` to finish (then aborts
    /// it), removes the socket and token file, and releases the kinds.
    async fn stop_serving(&self, running: &Running, grace: Duration) {
        running.stopping.cancel();
        let server = running
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut server) = server {
            if tokio::time::timeout(grace, &mut server).await.is_err() {
                server.abort();
                let _ = server.await;
            }
        }
        for path in [running.socket.clone(), self.config.token_path()] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(plugin = self.name, path = %path.display(), error = %e, "removing a file failed");
                }
            }
        }
        kinds::release(self.id);
    }

    async fn stop(&self) {
        let Some(running) = self.running() else {
            return;
        };
        let grace = self.config.shutdown_grace;
        if let Some(sup) = &running.supervisor {
            sup.begin_stop();
        }
        let shutdown_seq = self.queue.push(PluginEvent::Shutdown { grace }).seq;
        match &running.supervisor {
            Some(sup) => {
                sup.stop().await;
                if let Some(plan) = running.plan.clone() {
                    let _ = tokio::task::spawn_blocking(move || plan.remove_cgroup()).await;
                }
            }
            None => {
                // An external sidecar: wait for it to ack the Shutdown event or leave.
                let _ = tokio::time::timeout(grace, async {
                    while self.queue.acked() < shutdown_seq && running.host.connected() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
            }
        }
        self.stop_serving(&running, self.config.term_grace).await;
        let stats = self.stats();
        tracing::info!(
            plugin = self.name,
            delivered = stats.queue.delivered,
            acked = stats.queue.acked_seq,
            replayed = stats.queue.replayed,
            dropped_overflow = stats.queue.dropped_overflow,
            restarts = stats.restarts,
            depth = stats.queue.depth,
            "sidecar plugin stopped"
        );
    }
}

#[async_trait]
impl DaemonPlugin for SidecarPlugin {
    fn name(&self) -> &'static str {
        self.name
    }

    fn payload_kinds(&self) -> &'static [&'static str] {
        self.kinds
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) {
        let pushed = self.queue.push(PluginEvent::Payload {
            src,
            kind: intern_kind(kind, self.kinds),
            body,
        });
        if pushed.dropped > 0 {
            crate::overflow::report(self.name, &self.queue);
        }
    }

    async fn start(self: Arc<Self>, ctx: PluginContext) -> anyhow::Result<()> {
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("sidecar plugin `{}` is already started", self.name);
        }
        // Refused before anything started: the plugin may be started again.
        let refused = |e: anyhow::Error| {
            self.started
                .store(false, std::sync::atomic::Ordering::SeqCst);
            e
        };
        kinds::claim(kinds::daemon_of(&ctx), self.id, self.name, self.kinds).map_err(refused)?;
        let running = match self.serve(&ctx) {
            Ok(running) => running,
            Err(e) => {
                kinds::release(self.id);
                if self.config.required {
                    return Err(refused(e));
                }
                let why = format!(
                    "sidecar plugin `{}` cannot serve its socket: {e:#}",
                    self.name
                );
                tracing::error!(
                    plugin = self.name,
                    "{why}; the daemon runs on without it (required = false)"
                );
                *self.start_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                return Ok(());
            }
        };
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(running.clone());
        // The daemon-wide cancellation shuts the sidecar down too.
        let this = self.clone();
        tokio::spawn(async move {
            ctx.cancel.cancelled().await;
            this.shutdown().await;
        });
        if self.config.wait_for_register {
            if let Err(e) = self.wait_registered(&running, 0).await {
                if self.config.required {
                    self.shutdown().await;
                    return Err(e);
                }
                if !self.stats().failed {
                    // A failure was logged by the supervisor; a slow start
                    // is logged here, and the sidecar may still register.
                    tracing::error!(
                        plugin = self.name,
                        "{e:#}; the daemon runs on without it for now (required = false)"
                    );
                }
            }
        }
        Ok(())
    }

    async fn on_peer_forgotten(&self, peer: NodeId) {
        self.queue.push(PluginEvent::PeerForgotten { node: peer });
    }

    async fn shutdown(&self) {
        self.stopped.get_or_init(|| self.stop()).await;
    }
}
