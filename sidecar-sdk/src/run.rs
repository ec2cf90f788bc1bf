//! `run`: owning the sidecar process from `main` to exit.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin_proto::batch::{BatchEvent, EventBatch};
use pim_plugin_proto::convert::{self, PluginEvent, SequencedEvent};
use pim_plugin_proto::pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{ConnectOptions, Context, EventInfo, HostError, HostSession, Retry, Sidecar, RETRIES};
use pim_plugin_proto::backoff::Backoff;

/// Within a batch, the handled position is published for acking every
/// this many events (and always at the end of the batch).
const ACK_EVERY: u64 = 32;

/// Least time between two Ack calls. Each Ack is a unary call that wakes
/// both processes: at 2 ms, a sidecar at 1,000 payloads/s spent about a
/// sixth of its and the daemon's CPU on Acks. For a busy stream, 10 ms
/// bounds what a crash replays to 10 ms' worth of events, and what the
/// daemon's queue holds for a keeping-up sidecar to about 11,000 events at
/// 1.1 M/s (at light load, see [`AckPacing`]).
const ACK_INTERVAL: Duration = Duration::from_millis(10);

/// Longest time an Ack waits for more events at light load (see
/// [`AckPacing`]): what a crash replays then is at most this long's worth.
const ACK_LATER: Duration = Duration::from_millis(100);

/// Most events handled since the last Ack that still wait for more (see
/// [`AckPacing`]).
const ACK_LATER_EVENTS: u64 = 256;

/// Most bytes (bodies and kinds) handled since the last Ack that still wait
/// for more: what a lightly loaded plugin holds of a queue budget shared
/// with others, which the host's `Limits` do not show.
const ACK_LATER_BYTES: u64 = 256 << 10;

/// Name the SDK reports in Register.
const SDK_NAME: &str = "pim-sidecar (Rust)";

/// Runs `plugin` as this process's sidecar and returns the exit code for
/// `main`: reads the environment, sets up logging to stderr (the host
/// forwards it), builds a single-threaded runtime and calls [`run_async`].
///
/// ```no_run
/// # struct Echo;
/// # #[pim_sidecar::async_trait]
/// # impl pim_sidecar::Sidecar for Echo {
/// #     fn name(&self) -> &str { "echo" }
/// #     fn payload_kinds(&self) -> &[&str] { &["echo.ping"] }
/// #     async fn handle_payload(&self, _: pim_sidecar::NodeId, _: &str, _: pim_sidecar::Bytes) -> pim_sidecar::anyhow::Result<()> { Ok(()) }
/// # }
/// fn main() -> std::process::ExitCode {
///     pim_sidecar::run(Echo)
/// }
/// ```
pub fn run<S: Sidecar>(plugin: S) -> ExitCode {
    init_logging();
    let options = match ConnectOptions::from_env() {
        Ok(o) => o,
        Err(e) => {
            // A configuration problem (no socket, a bad token descriptor):
            // starting the process again cannot fix it.
            tracing::error!("{e:#}");
            return ExitCode::from(pim_plugin_proto::EXIT_REFUSED);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_async(Arc::new(plugin), options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<RegisterRefused>() => {
            tracing::error!("{e:#}");
            ExitCode::from(pim_plugin_proto::EXIT_REFUSED)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logging to stderr, filtered by `RUST_LOG` as a full `EnvFilter`
/// directive (`info,my_plugin=debug`); INFO when it is unset. A directive
/// that does not parse is skipped and the rest of it still applies.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing::Level::INFO.into())
        .from_env_lossy();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_env_filter(filter)
        // Once the daemon is gone its end of stderr is closed: a failed
        // write must not be reported on stderr again, which would panic.
        .log_internal_errors(false)
        .try_init();
}

/// Connects, registers, starts `plugin` and delivers events until Shutdown
/// or until the host is gone for longer than the reconnect timeout.
///
/// On SIGTERM (a supervisor replacing the process, a service manager
/// stopping it, or the daemon's watchdog after the daemon is gone) it
/// finishes the event in hand, acks what it handled, calls
/// [`Sidecar::shutdown`] and returns `Ok`.
pub async fn run_async<S: Sidecar + ?Sized>(
    plugin: Arc<S>,
    options: ConnectOptions,
) -> anyhow::Result<()> {
    let kinds = plugin.payload_kinds().to_vec();
    let name = plugin.name().to_owned();
    let term = Terminate::new();
    // SIGTERM while the host is not reachable yet, or while another client
    // holds the session, ends the wait: nothing was started.
    let (host, registered) = tokio::select! {
        biased;
        () = term.received() => {
            tracing::info!("SIGTERM before registering: exiting");
            return Ok(());
        }
        connected = connect_and_register(&options, &name, &kinds) => connected?,
    };
    // Only the first Register may take over: one that follows a lost
    // stream must not take the session from whoever holds it now.
    let options = ConnectOptions {
        takeover: false,
        ..options
    };
    tracing::info!(acked = registered.acked_seq, "registered");
    let cancel = CancellationToken::new();
    let _cancel_on_exit = cancel.clone().drop_guard();
    let granted = registered
        .granted
        .iter()
        .filter_map(|c| convert::capability("granted", *c).ok())
        .collect();
    plugin
        .start(Context {
            host: host.ports(),
            data_dir: registered.data_dir.clone().into(),
            granted,
            cancel: cancel.clone(),
        })
        .await?;

    let pacing = AckPacing::new(registered.limits.as_ref());
    let acked = Handled {
        seq: registered.acked_seq,
        bytes: 0,
        pacing,
    };
    let (ack_tx, ack_rx) = watch::channel(acked);
    let acking = host.clone();
    tokio::spawn(ack_loop(ack_rx, acked, move |seq| {
        let host = acking.clone();
        async move {
            if let Err(e) = host.ack(seq).await {
                tracing::debug!(seq, "ack failed (retried after reconnect): {e}");
            }
        }
    }));
    let mut delivery = Delivery {
        instance: Arc::from(registered.host_instance.as_str()),
        last_handled: registered.acked_seq,
        bytes_handled: 0,
        pacing,
        duplicates: 0,
    };
    delivery.skip_applied(&*plugin, &ack_tx).await;
    // A stream that ends right after its Register (a host that accepts the
    // session, then drops it) is not met with an instant Register again:
    // such cycles back off, 20 ms doubling to 2 s.
    let mut registered_at = Instant::now();
    let mut cycles = Backoff::reconnect();
    loop {
        let ended = deliver(&*plugin, &host, &mut delivery, &ack_tx, &term, &cancel).await;
        match ended {
            Ok(Ended::Shutdown) => {
                tracing::info!(duplicates = delivery.duplicates, "shut down by the host");
                return Ok(());
            }
            Ok(Ended::Terminated) => {
                return terminated(&*plugin, &host, &delivery, &cancel).await;
            }
            Ok(Ended::Superseded) => {
                tracing::warn!("another client took this plugin's session over: stopping");
                cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), plugin.shutdown()).await;
                return Ok(());
            }
            Ok(Ended::StreamClosed) => tracing::warn!("the host closed the event stream"),
            Err(e) => tracing::warn!("event stream lost: {e}"),
        }
        if registered_at.elapsed() < Duration::from_secs(1) {
            tokio::select! {
                biased;
                () = term.received() => return terminated(&*plugin, &host, &delivery, &cancel).await,
                () = tokio::time::sleep(cycles.next_pause()) => {}
            }
        } else {
            cycles.reset();
        }
        let resp = tokio::select! {
            biased;
            () = term.received() => return terminated(&*plugin, &host, &delivery, &cancel).await,
            resp = register(&options, &host, &name, &kinds) => resp?,
        };
        tracing::info!(acked = resp.acked_seq, "registered again");
        registered_at = Instant::now();
        delivery.resume(&resp, &ack_tx);
        delivery.skip_applied(&*plugin, &ack_tx).await;
    }
}

/// SIGTERM, when this process may catch it: noted by a task of its own,
/// so the delivery loop can look at it between two events.
struct Terminate {
    received: Arc<std::sync::atomic::AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Terminate {
    fn new() -> Self {
        let this = Self {
            received: Arc::default(),
            notify: Arc::default(),
        };
        if sigterm_ignored() {
            // The process (or whoever started it) chose to ignore SIGTERM.
            return this;
        }
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                let (received, notify) = (this.received.clone(), this.notify.clone());
                tokio::spawn(async move {
                    signal.recv().await;
                    received.store(true, std::sync::atomic::Ordering::SeqCst);
                    notify.notify_waiters();
                });
            }
            Err(e) => {
                tracing::warn!("SIGTERM will end the process at once: cannot catch it ({e})")
            }
        }
        this
    }

    /// Whether SIGTERM arrived.
    fn requested(&self) -> bool {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when SIGTERM arrives; never when it cannot be caught.
    async fn received(&self) {
        loop {
            let notified = self.notify.notified();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }
}

/// Whether SIGTERM's disposition is "ignore".
fn sigterm_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current
    // disposition into `old`, a zeroed sigaction that lives on this stack.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The end after SIGTERM: ack what was handled, then the plugin's shutdown.
async fn terminated<S: Sidecar + ?Sized>(
    plugin: &S,
    host: &HostSession,
    delivery: &Delivery,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        handled = delivery.last_handled,
        "SIGTERM: acking what was handled and shutting down"
    );
    if let Err(e) = host.ack(delivery.last_handled).await {
        tracing::debug!("final ack failed (those events are delivered again): {e}");
    }
    cancel.cancel();
    plugin.shutdown().await;
    Ok(())
}

struct Delivery {
    /// The host instance whose sequence numbers `last_handled` refers to.
    instance: Arc<str>,
    /// Highest seq handled by this process; lower ones are duplicates.
    last_handled: u64,
    /// Payload body and kind bytes handled by this process, for
    /// [`AckPacing`].
    bytes_handled: u64,
    /// From the latest Register's limits.
    pacing: AckPacing,
    duplicates: u64,
}

impl Delivery {
    /// After a new Register: a restarted host numbers its events afresh,
    /// and its limits may differ. The ack task gets the new position at
    /// once, so that a position of the host before does not reach this one.
    fn resume(&mut self, resp: &pb::RegisterResponse, ack: &watch::Sender<Handled>) {
        self.pacing = AckPacing::new(resp.limits.as_ref());
        if *resp.host_instance != *self.instance {
            tracing::info!(
                acked = resp.acked_seq,
                "the host restarted: its sequence numbers start over"
            );
            self.instance = Arc::from(resp.host_instance.as_str());
            self.last_handled = resp.acked_seq;
        }
        self.publish(ack);
    }

    /// Skips, and acks, what the plugin has applied durably already
    /// ([`Sidecar::applied`]) in this host instance.
    async fn skip_applied<S: Sidecar + ?Sized>(
        &mut self,
        plugin: &S,
        ack: &watch::Sender<Handled>,
    ) {
        let Some(applied) = plugin.applied().await else {
            return;
        };
        if *applied.host_instance != *self.instance {
            return;
        }
        if applied.seq > self.last_handled {
            tracing::info!(
                applied = applied.seq,
                acked = self.last_handled,
                "skipping the events the plugin applied already"
            );
            self.last_handled = applied.seq;
            self.publish(ack);
        }
    }

    /// Hands the position handled so far to the ack task.
    fn publish(&self, ack: &watch::Sender<Handled>) {
        ack.send_replace(Handled {
            seq: self.last_handled,
            bytes: self.bytes_handled,
            pacing: self.pacing,
        });
    }

    /// The event `seq` of this delivery, for [`EventInfo::current`].
    fn info(&self, seq: u64) -> EventInfo {
        EventInfo {
            seq,
            host_instance: self.instance.clone(),
        }
    }
}

enum Ended {
    Shutdown,
    StreamClosed,
    Terminated,
    /// Another client took the session over: stop, do not register again.
    Superseded,
}

/// Whether `status` says this client's session was taken over.
fn superseded(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Aborted
        && status
            .metadata()
            .get("pim-session-end")
            .is_some_and(|v| v.as_bytes() == b"superseded")
}

/// Delivers one Events stream's events in order.
async fn deliver<S: Sidecar + ?Sized>(
    plugin: &S,
    host: &HostSession,
    delivery: &mut Delivery,
    ack: &watch::Sender<Handled>,
    term: &Terminate,
    cancel: &CancellationToken,
) -> anyhow::Result<Ended> {
    let mut stream = match host.event_batches().await {
        Err(HostError::Rpc(s)) if superseded(&s) => return Ok(Ended::Superseded),
        other => other?,
    };
    loop {
        // SIGTERM is looked at between events: the event in hand is finished.
        let batch = tokio::select! {
            biased;
            () = term.received() => return Ok(stopping(host, delivery, stream).await),
            batch = stream.message() => match batch {
                Err(s) if superseded(&s) => return Ok(Ended::Superseded),
                other => other.map_err(HostError::from)?,
            },
        };
        let Some(batch) = batch else { break };
        // Each event is read from the batch's bytes when its turn comes: a
        // payload's kind borrowed, its body a slice of the batch.
        for event in batch.events() {
            let event =
                event.map_err(|e| anyhow::anyhow!("the host sent an invalid event: {e}"))?;
            let seq = match event {
                BatchEvent::Payload {
                    seq,
                    src,
                    kind,
                    body,
                } => {
                    if seq <= delivery.last_handled {
                        delivery.duplicates += 1;
                        continue;
                    }
                    deliver_payload(plugin, delivery, seq, src, kind, body).await;
                    seq
                }
                BatchEvent::Other(wire) => {
                    if wire.event.is_none() && wire.seq != 0 {
                        // A kind of event a newer host knows and this SDK
                        // does not: nothing to do, so it counts as handled
                        // (and is acked); sent again before that Ack
                        // arrived, it is a duplicate like any other.
                        if wire.seq <= delivery.last_handled {
                            delivery.duplicates += 1;
                        } else {
                            tracing::debug!(
                                seq = wire.seq,
                                "an event of a kind this SDK does not know: skipped"
                            );
                            delivery.last_handled = wire.seq;
                        }
                        continue;
                    }
                    let SequencedEvent { seq, event } = SequencedEvent::try_from(wire)
                        .map_err(|e| anyhow::anyhow!("the host sent an invalid event: {e}"))?;
                    if seq <= delivery.last_handled {
                        delivery.duplicates += 1;
                        continue;
                    }
                    match event {
                        PluginEvent::Payload { src, kind, body } => {
                            deliver_payload(plugin, delivery, seq, src, &kind, body).await;
                        }
                        PluginEvent::PeerForgotten { node } => {
                            crate::once::scoped(delivery.info(seq), plugin.on_peer_forgotten(node))
                                .await;
                        }
                        PluginEvent::Shutdown { grace } => {
                            tracing::info!(
                                grace_ms = grace.as_millis() as u64,
                                "shutdown requested"
                            );
                            // As on every way out: the plugin's tasks are told
                            // first, so a `shutdown` that waits for them does
                            // not wait long.
                            cancel.cancel();
                            let _ = tokio::time::timeout(grace, plugin.shutdown()).await;
                            delivery.last_handled = seq;
                            // The daemon may be gone by now (one that exits
                            // soon after cancelling): the clean-up is done
                            // all the same.
                            if let Err(e) = host.ack(seq).await {
                                tracing::debug!("acking the Shutdown event failed: {e}");
                            }
                            return Ok(Ended::Shutdown);
                        }
                        // An event this SDK has no handler for: handled, as
                        // an unknown kind on the wire is.
                        _ => tracing::debug!(seq, "an event this SDK has no handler for: skipped"),
                    }
                    seq
                }
            };
            delivery.last_handled = seq;
            if term.requested() {
                return Ok(stopping(host, delivery, stream).await);
            }
            // The ack task sends the newest position whenever it gets to run;
            // publishing it every few events keeps acks flowing through a
            // long batch without waking the ack task for each event.
            if seq % ACK_EVERY == 0 {
                delivery.publish(ack);
            }
        }
        delivery.publish(ack);
    }
    Ok(Ended::StreamClosed)
}

/// Hands payload `seq` to the plugin, again while it asks for a retry (at
/// most [`RETRIES`] more times, with backoff).
async fn deliver_payload<S: Sidecar + ?Sized>(
    plugin: &S,
    delivery: &mut Delivery,
    seq: u64,
    src: NodeId,
    kind: &str,
    body: Bytes,
) {
    delivery.bytes_handled += (body.len() + kind.len()) as u64;
    let mut attempt = 0;
    let mut retries = crate::once::retry_backoff();
    loop {
        let handled = crate::once::scoped(
            delivery.info(seq),
            plugin.handle_payload(src, kind, body.clone()),
        )
        .await;
        match handled {
            Ok(()) => break,
            Err(e) if e.is::<Retry>() && attempt < RETRIES => {
                attempt += 1;
                tracing::debug!(seq, attempt, "{e:#}");
                tokio::time::sleep(retries.next_pause()).await;
            }
            Err(e) if e.is::<Retry>() => {
                tracing::error!(seq, kind = %kind, "handle_payload asked for a retry {RETRIES} times; the event counts as handled: {e:#}");
                break;
            }
            Err(e) => {
                tracing::warn!(seq, kind = %kind, "handle_payload failed: {e:#}");
                break;
            }
        }
    }
}

/// SIGTERM: acks what was handled while the Events stream is still open (a
/// closed stream ends the session's liveness, and a client waiting for the
/// session could take it before the Ack), then lets the stream go.
async fn stopping(
    host: &HostSession,
    delivery: &Delivery,
    stream: tonic::Streaming<EventBatch>,
) -> Ended {
    if let Err(e) = host.ack(delivery.last_handled).await {
        tracing::debug!("final ack failed (those events are delivered again): {e}");
    }
    drop(stream);
    Ended::Terminated
}

/// What the delivery loop has handled: the seq, and the bytes of payload
/// bodies and kinds; and how to pace its Acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handled {
    seq: u64,
    bytes: u64,
    pacing: AckPacing,
}

/// When an Ack is worth sending. Each Ack is a unary call that wakes both
/// processes, and an event that arrives meanwhile waits for it: at 1,000
/// payloads/s, an Ack every 10 ms was the whole of the delivery latency's
/// p99 above the raw stream's (`docs/BENCHMARKS.md`). So while fewer than
/// a sixteenth of the host's queue bounds (events or bytes, at most
/// [`ACK_LATER_EVENTS`] and [`ACK_LATER_BYTES`]) were handled since the
/// last Ack, the next one waits for more, up to [`ACK_LATER`] after the
/// last. A busy stream
/// passes those counts within its [`ACK_INTERVAL`] and is acked as
/// before; a host that announces no bounds is acked at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckPacing {
    events: u64,
    bytes: u64,
}

impl AckPacing {
    fn new(limits: Option<&pb::Limits>) -> Self {
        match limits {
            Some(l) if l.max_queued_events > 0 && l.max_queued_bytes > 0 => Self {
                events: (u64::from(l.max_queued_events) / 16).clamp(1, ACK_LATER_EVENTS),
                bytes: (l.max_queued_bytes / 16).clamp(1, ACK_LATER_BYTES),
            },
            _ => Self {
                events: 1,
                bytes: 1,
            },
        }
    }

    /// Whether `now` is worth an Ack already, `acked` being what the last
    /// one covered (a lower seq: a restarted host, acked at once).
    fn due(&self, acked: Handled, now: Handled) -> bool {
        now.seq < acked.seq
            || now.seq - acked.seq >= self.events
            || now.bytes.saturating_sub(acked.bytes) >= self.bytes
    }
}

/// Sends (with `ack`) the newest handled seq whenever it moves from
/// `acked` (what the host has), one Ack in flight at a time, at most one
/// per [`ACK_INTERVAL`], paced by the [`AckPacing`] published with it.
async fn ack_loop<F, Fut>(mut handled: watch::Receiver<Handled>, mut acked: Handled, mut ack: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // An idle sidecar's first Ack goes out at once.
    let started = tokio::time::Instant::now();
    let mut last_ack = started.checked_sub(ACK_LATER).unwrap_or(started);
    while handled.changed().await.is_ok() {
        let deadline = last_ack + ACK_LATER;
        loop {
            let now = *handled.borrow_and_update();
            if now.pacing.due(acked, now) {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                changed = handled.changed() => if changed.is_err() { return },
            }
        }
        let now = *handled.borrow_and_update();
        ack(now.seq).await;
        acked = now;
        last_ack = tokio::time::Instant::now();
        // Under load, one ack per interval covers everything handled in it:
        // a busy stream then costs a few hundred Ack calls a second, not one
        // per batch.
        tokio::time::sleep(ACK_INTERVAL).await;
    }
}

/// Connects, then registers, both retried like a reconnect: a host that
/// goes away in the middle (even after it counted the Register) is waited
/// for until the reconnect timeout, not taken for a refusal.
async fn connect_and_register(
    options: &ConnectOptions,
    name: &str,
    kinds: &[&str],
) -> anyhow::Result<(HostSession, pb::RegisterResponse)> {
    let host = retry_connect(options).await?;
    let resp = register(options, &host, name, kinds).await?;
    Ok((host, resp))
}

/// The host's configuration and the sidecar disagree (Register refused, a
/// needed capability not granted): a retry cannot fix it, so [`run`] exits
/// with [`pim_plugin_proto::EXIT_REFUSED`] and the supervisor does not
/// restart the process.
#[derive(Debug)]
#[non_exhaustive]
pub struct RegisterRefused(pub String);

impl RegisterRefused {
    /// A refusal for `why`: for a plugin whose configuration cannot work
    /// (a capability it needs was not granted, say), so that [`run`] exits
    /// with [`pim_plugin_proto::EXIT_REFUSED`] and is not restarted.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl std::fmt::Display for RegisterRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused by the host's configuration: {}", self.0)
    }
}

impl std::error::Error for RegisterRefused {}

/// Connects, retrying with backoff until the reconnect timeout.
async fn retry_connect(options: &ConnectOptions) -> anyhow::Result<HostSession> {
    let started = Instant::now();
    let mut backoff = Backoff::reconnect();
    loop {
        match HostSession::connect(&options.socket, &options.token).await {
            Ok(host) => return Ok(host.with_busy_poll(options.busy_poll)),
            Err(e @ HostError::InvalidToken(_)) => {
                return Err(RegisterRefused(e.to_string()).into())
            }
            Err(e) => {
                if options
                    .reconnect_timeout
                    .is_some_and(|t| started.elapsed() >= t)
                {
                    anyhow::bail!(
                        "gave up reaching the host at {} after {:?}: {e}",
                        options.socket.display(),
                        started.elapsed()
                    );
                }
                tracing::debug!("host not reachable yet: {e}");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

/// Registers a session: at start, and after the stream was lost. The
/// connection itself re-dials the socket on its own; this retries Register
/// until the host answers or the reconnect timeout runs out. A refusal
/// (`FAILED_PRECONDITION`, `INVALID_ARGUMENT`) is final. While another
/// client holds a live session (`ALREADY_EXISTS`), it waits, however long:
/// the host is there, and the session is free when that client ends.
async fn register(
    options: &ConnectOptions,
    host: &HostSession,
    name: &str,
    kinds: &[&str],
) -> anyhow::Result<pb::RegisterResponse> {
    let mut started = Instant::now();
    let mut backoff = Backoff::reconnect();
    let mut waiting: Option<Backoff> = None;
    loop {
        if let Some(file) = &options.token_file {
            match crate::read_token_file(file).map(|token| host.set_token(&token)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("token file holds no valid token yet: {e}"),
                Err(e) => tracing::debug!("token file not readable yet: {e:#}"),
            }
        }
        match host.register(name, kinds, SDK_NAME, options.takeover).await {
            Ok(resp) => return Ok(resp),
            Err(HostError::Rpc(s)) if s.code() == tonic::Code::AlreadyExists => {
                let waiting = waiting.get_or_insert_with(|| {
                    tracing::info!(
                        "another client holds this plugin's session; waiting for it to end ({})",
                        s.message()
                    );
                    Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
                });
                tokio::time::sleep(waiting.next_pause()).await;
                started = Instant::now();
            }
            Err(HostError::Rpc(s)) if refusal(&s, options.spawned) => {
                return Err(RegisterRefused(s.message().to_owned()).into());
            }
            Err(e) => {
                if options
                    .reconnect_timeout
                    .is_some_and(|t| started.elapsed() >= t)
                {
                    anyhow::bail!(
                        "the host is gone (gave up after {:?}): {e}",
                        started.elapsed()
                    );
                }
                tracing::debug!("host not back yet: {e}");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

/// Whether a Register answer is final: the host's configuration refuses
/// this plugin (`FAILED_PRECONDITION`, `INVALID_ARGUMENT`), or, for a
/// spawned sidecar, the token and uid the host itself handed it
/// (`UNAUTHENTICATED`, `PERMISSION_DENIED`). One that runs on its own
/// retries those two: the host may come back with a new token file.
fn refusal(status: &tonic::Status, spawned: bool) -> bool {
    match status.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => true,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => spawned,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(events: u32, bytes: u64) -> pb::Limits {
        pb::Limits {
            max_queued_events: events,
            max_queued_bytes: bytes,
            ..Default::default()
        }
    }

    fn at(seq: u64, bytes: u64) -> Handled {
        Handled {
            seq,
            bytes,
            pacing: AckPacing {
                events: 4,
                bytes: 1 << 20,
            },
        }
    }

    #[test]
    fn a_few_events_wait_for_more_and_256_events_or_256_kib_are_acked_at_once() {
        // The host's defaults: 65,536 events, 64 MiB.
        let pacing = AckPacing::new(Some(&limits(65_536, 64 << 20)));
        assert_eq!(
            pacing,
            AckPacing {
                events: 256,
                bytes: 256 << 10
            }
        );
        let acked = at(1_000, 50_000);
        assert!(
            !pacing.due(acked, at(1_001, 50_064)),
            "one small event waits"
        );
        assert!(!pacing.due(acked, at(1_255, 66_320)));
        assert!(pacing.due(acked, at(1_256, 66_384)), "256 events do not");
        assert!(
            !pacing.due(acked, at(1_003, 50_000 + (256 << 10) - 1)),
            "just under 256 KiB waits"
        );
        assert!(
            pacing.due(acked, at(1_003, 50_000 + (256 << 10))),
            "256 KiB (the cap below a sixteenth of 64 MiB) does not"
        );
        assert!(
            pacing.due(acked, at(3, 0)),
            "a restarted host numbers afresh"
        );
    }

    #[test]
    fn small_bounds_make_acks_come_sooner_and_no_bounds_ack_every_move() {
        let small = AckPacing::new(Some(&limits(64, 1 << 20)));
        assert_eq!(
            small,
            AckPacing {
                events: 4,
                bytes: 64 << 10
            }
        );
        assert!(small.due(at(0, 0), at(4, 0)));
        assert!(small.due(at(0, 0), at(1, 64 << 10)));
        let tiny = AckPacing::new(Some(&limits(8, 8)));
        assert_eq!(
            tiny,
            AckPacing {
                events: 1,
                bytes: 1
            }
        );
        for none in [None, Some(limits(0, 0)), Some(limits(100, 0))] {
            let pacing = AckPacing::new(none.as_ref());
            assert!(pacing.due(at(7, 0), at(8, 0)), "{none:?}");
        }
    }

    #[test]
    fn a_restarted_host_gets_its_own_position_and_limits_at_once() {
        let (tx, rx) = watch::channel(at(0, 0));
        let mut delivery = Delivery {
            instance: Arc::from("before"),
            last_handled: 500,
            bytes_handled: 9_000,
            pacing: AckPacing::new(Some(&limits(65_536, 64 << 20))),
            duplicates: 0,
        };
        let resp = pb::RegisterResponse {
            host_instance: "after".into(),
            acked_seq: 3,
            limits: Some(limits(64, 1 << 20)),
            ..Default::default()
        };
        delivery.resume(&resp, &tx);
        let published = *rx.borrow();
        assert_eq!((published.seq, published.bytes), (3, 9_000));
        assert_eq!(
            published.pacing,
            AckPacing {
                events: 4,
                bytes: 64 << 10
            }
        );
        // The position the ack task held (500, of the host before) is
        // above it: due at once, so it is never sent to the new host.
        assert!(published.pacing.due(at(500, 9_000), published));
    }

    #[tokio::test(start_paused = true)]
    async fn at_light_load_acks_wait_until_enough_or_the_latest_time() {
        let (tx, rx) = watch::channel(at(0, 0));
        let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(ack_loop(rx, at(0, 0), move |seq| {
            acks_tx.send((seq, tokio::time::Instant::now())).unwrap();
            async {}
        }));
        // (pause before, position handled, when its Ack is due after it, why)
        let steps = [
            (
                Duration::ZERO,
                at(1, 64),
                Duration::ZERO,
                "the first after idle: at once",
            ),
            (
                Duration::ZERO,
                at(2, 128),
                ACK_LATER,
                "one more: after ACK_LATER",
            ),
            (
                ACK_INTERVAL,
                at(6, 384),
                Duration::ZERO,
                "enough events: at once",
            ),
            (
                ACK_INTERVAL,
                at(7, 384 + (1 << 20)),
                Duration::ZERO,
                "enough bytes: at once",
            ),
            (
                Duration::ZERO,
                at(20, 0),
                ACK_INTERVAL,
                "never two within ACK_INTERVAL",
            ),
        ];
        for (pause, handled, due, why) in steps {
            tokio::time::sleep(pause).await;
            let start = tokio::time::Instant::now();
            tx.send_replace(handled);
            let (seq, when) = acks.recv().await.unwrap();
            assert_eq!((seq, when - start), (handled.seq, due), "{why}");
        }
        drop(tx);
        task.await.unwrap();
    }
}
