//! The bounded per-plugin event queue between the daemon and the sidecar.
//!
//! The daemon pushes (never blocking); the Events stream reads batches after
//! a cursor; the sidecar's cumulative Ack trims. Events stay in the queue
//! until acked, so a new stream (a restarted or reconnected sidecar) replays
//! everything after the last ack.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pim_plugin_proto::convert::{PluginEvent, SequencedEvent};
use tokio::sync::Notify;

use crate::config::QueueLimits;
use crate::doorbell::{Doorbell, Listener};

/// Bytes charged per queued event on top of its body and kind, for the
/// queue's own bookkeeping.
pub const EVENT_OVERHEAD_BYTES: usize = 96;

/// A memory budget that the event queues of several plugins share, besides
/// each queue's own bound ([`QueueLimits`](crate::QueueLimits)): the
/// daemon-wide cap on what its plugins' queues hold together, counted as
/// each queue counts its bytes.
///
/// Each plugin is entitled to an equal share (the budget divided by the
/// queues that share it); above its share a plugin may use what the others
/// leave free. When the budget is full, a payload for a plugin above its
/// share drops that plugin's oldest payloads (never another plugin's) and
/// counts them in [`QueueStats::dropped_budget`]; a plugin within its share
/// always gets room. So a stalled or flooded plugin cannot take the
/// others' room. The price is the bound: plugins within their share may
/// take room while over-share plugins still hold theirs, which they give
/// back on their next payload (or their sidecar's acks) and not before, so
/// the total stays below twice the budget, not below the budget; pushes to
/// different plugins at the same moment may each add one event more. With
/// a budget smaller than one event per plugin, a plugin over its share
/// keeps only the newest payload. Lifecycle events are never dropped.
///
/// Clones share one budget: give a clone to each plugin's
/// [`SidecarConfig::queue_budget`](crate::SidecarConfig::queue_budget).
#[derive(Clone)]
pub struct QueueBudget(Arc<BudgetShared>);

struct BudgetShared {
    max_bytes: usize,
    used: AtomicUsize,
    /// Queues sharing it.
    members: AtomicUsize,
}

impl QueueBudget {
    /// A budget of `max_bytes` for all the queues that share it.
    pub fn new(max_bytes: usize) -> Self {
        Self(Arc::new(BudgetShared {
            max_bytes,
            used: AtomicUsize::new(0),
            members: AtomicUsize::new(0),
        }))
    }

    /// The bound.
    pub fn max_bytes(&self) -> usize {
        self.0.max_bytes
    }

    /// Bytes the sharing queues hold now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Whether a queue that holds `own` bytes must make room before it
    /// takes `size` more: the budget is full and it is above its share.
    fn must_shed(&self, own: usize, size: usize) -> bool {
        let b = &*self.0;
        b.used.load(Ordering::Relaxed) + size > b.max_bytes
            && own + size > b.max_bytes / b.members.load(Ordering::Relaxed).max(1)
    }
}

impl std::fmt::Debug for QueueBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBudget")
            .field("max_bytes", &self.max_bytes())
            .field("used", &self.used())
            .field("queues", &self.0.members.load(Ordering::Relaxed))
            .finish()
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// The new event's sequence number.
    pub(crate) seq: u64,
    /// Payloads dropped (oldest first) to make room.
    pub(crate) dropped: u64,
}

/// Counters of one queue, a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Events pushed.
    pub pushed: u64,
    /// Highest sequence number acked.
    pub acked_seq: u64,
    /// Events sent to a sidecar, replays included.
    pub delivered: u64,
    /// Events sent again to a new stream after having been sent before.
    pub replayed: u64,
    /// Payloads dropped because the queue was full (its own bounds, or the
    /// shared budget).
    pub dropped_overflow: u64,
    /// Of those, the payloads dropped for the [`QueueBudget`] the queue
    /// shares with other plugins while its own bounds had room.
    pub dropped_budget: u64,
    /// Events in the queue (not acked yet).
    pub depth: usize,
    /// Bytes charged for them.
    pub bytes: usize,
}

/// The stream side of a queue: what the Events stream, acks and the
/// clean-up work on. A push takes its lock only to make room, or (with
/// `try_lock`, never waiting) to move a large inbox over.
struct State {
    /// Events taken from the inbox and not forgotten yet, oldest first.
    events: VecDeque<SequencedEvent>,
    /// The inbox's other buffer, empty between uses: the two are swapped
    /// to take the inbox's events in.
    spare: Vec<SequencedEvent>,
    acked: u64,
    /// Highest seq ever handed to a stream.
    sent: u64,
    stats: QueueStats,
    last_ack_at: Instant,
}

/// The producer side of a queue: events pushed and not yet taken in by the
/// stream side. Its lock is held for one push or one swap of buffers (and,
/// with the stream side's lock, while a push makes room or the clean-up
/// shrinks the inbox), so `handle_payload` does not wait on the stream
/// side's work: cloning a batch, an ack, forgetting acked events.
struct Inbox {
    events: Vec<SequencedEvent>,
    next_seq: u64,
    /// Bytes ever charged; the queue holds `charged - released_bytes`.
    charged: usize,
}

/// Why an event does not fit without making room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// The queue's own bounds.
    Own,
    /// The shared budget is full and this queue is above its share.
    Budget,
}

/// The bounded event queue of one plugin.
pub(crate) struct EventQueue {
    limits: QueueLimits,
    instance: String,
    /// The budget shared with other plugins' queues, charged with the bytes.
    budget: Option<QueueBudget>,
    /// Lock order: `state`, then `inbox`.
    state: Mutex<State>,
    inbox: Mutex<Inbox>,
    /// Bytes and events ever given back (forgotten or dropped), written
    /// under the `state` lock: a push reads what the queue holds without
    /// taking that lock.
    released_bytes: AtomicUsize,
    released_events: AtomicU64,
    /// When the sidecar last made progress (an ack moved, a stream opened,
    /// or an event arrived at a caught-up queue), in ns since `created`.
    last_progress: AtomicU64,
    created: Instant,
    /// Wakes the waiting Events stream.
    bell: Doorbell,
    /// Woken when an event arrives at a queue with nothing pending (the
    /// stuck check sleeps on it while the sidecar is all caught up).
    pending: Notify,
    /// Whether a task waits on `pending`: a push notifies only then, so the
    /// hot path takes no extra lock while the stuck check sleeps on a timer.
    pending_waiter: AtomicBool,
    /// Mirrors `state.acked` for lock-free reads.
    acked: AtomicU64,
    /// The newest seq, stored under the inbox lock once its event is there.
    newest: AtomicU64,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn cost(event: &PluginEvent) -> usize {
    let kind = match event {
        PluginEvent::Payload { kind, .. } => kind.len(),
        _ => 0,
    };
    event.body_len() + kind + EVENT_OVERHEAD_BYTES
}

impl Drop for EventQueue {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            let charged = self
                .inbox
                .get_mut()
                .map_or_else(|e| e.into_inner().charged, |i| i.charged);
            let held = charged - self.released_bytes.load(Ordering::Relaxed);
            b.0.used.fetch_sub(held, Ordering::Relaxed);
            b.0.members.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl EventQueue {
    /// An empty queue with these bounds.
    #[cfg(test)]
    pub(crate) fn new(limits: QueueLimits) -> Self {
        Self::with_budget(limits, None)
    }

    /// An empty queue with these bounds that also shares `budget`.
    pub(crate) fn with_budget(limits: QueueLimits, budget: Option<QueueBudget>) -> Self {
        if let Some(b) = &budget {
            b.0.members.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            limits,
            instance: crate::secret::random_hex(8),
            budget,
            state: Mutex::new(State {
                events: VecDeque::with_capacity(limits.max_events.min(MIN_KEPT_CAPACITY)),
                spare: Vec::new(),
                acked: 0,
                sent: 0,
                stats: QueueStats::default(),
                last_ack_at: Instant::now(),
            }),
            inbox: Mutex::new(Inbox {
                events: Vec::new(),
                next_seq: 1,
                charged: 0,
            }),
            released_bytes: AtomicUsize::new(0),
            released_events: AtomicU64::new(0),
            last_progress: AtomicU64::new(0),
            created: Instant::now(),
            bell: Doorbell::default(),
            pending: Notify::new(),
            pending_waiter: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            newest: AtomicU64::new(0),
        }
    }

    /// A random id of this queue: sequence numbers are comparable only
    /// between events of one instance.
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    fn lock_inbox(&self) -> MutexGuard<'_, Inbox> {
        // Every mutation under either lock is completed before anything can
        // panic, so a poisoned lock still guards a consistent queue.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream side, with every event pushed so far taken in from the
    /// inbox (which this locks only for a swap of buffers).
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut guard = self.lock_state();
        self.take_in(&mut guard);
        guard
    }

    /// The stream side as it is (the inbox not taken in).
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the inbox's events to the stream side.
    fn take_in(&self, st: &mut State) {
        swap_in(st, &mut self.lock_inbox());
        st.events.extend(st.spare.drain(..));
    }

    /// Whether an event of `size` bytes does not fit without making room.
    fn full(&self, inbox: &Inbox, size: usize) -> Option<Full> {
        let events = inbox.next_seq - 1 - self.released_events.load(Ordering::Relaxed);
        let bytes = inbox.charged - self.released_bytes.load(Ordering::Relaxed);
        if events >= self.limits.max_events as u64 || bytes + size > self.limits.max_bytes {
            Some(Full::Own)
        } else if self
            .budget
            .as_ref()
            .is_some_and(|b| b.must_shed(bytes, size))
        {
            Some(Full::Budget)
        } else {
            None
        }
    }

    /// Numbers and charges an event; the caller stores it (under the inbox
    /// lock) and then publishes its seq. Also says whether the sidecar was
    /// caught up.
    fn stamp(&self, inbox: &mut Inbox, event: PluginEvent, size: usize) -> (SequencedEvent, bool) {
        let seq = inbox.next_seq;
        let caught_up = self.acked.load(Ordering::SeqCst) == seq - 1;
        if caught_up {
            // Nothing was pending: the sidecar has not fallen behind yet.
            self.mark_progress();
        }
        inbox.next_seq += 1;
        inbox.charged += size;
        if let Some(b) = &self.budget {
            b.0.used.fetch_add(size, Ordering::Relaxed);
        }
        (SequencedEvent { seq, event }, caught_up)
    }

    /// Counts an event of `size` bytes given back (forgotten or dropped);
    /// called under the `state` lock.
    fn release(&self, size: usize) {
        self.released_bytes.fetch_add(size, Ordering::Relaxed);
        self.released_events.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &self.budget {
            b.0.used.fetch_sub(size, Ordering::Relaxed);
        }
    }

    fn mark_progress(&self) {
        let now = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_progress.store(now, Ordering::Relaxed);
    }

    /// Wakes the stream, and the stuck check if it waits for a first
    /// pending event.
    fn announce(&self, was_caught_up: bool) {
        self.bell.ring_if_armed();
        // SeqCst, paired with `until_pending`: either this sees its flag, or
        // its check under the lock sees this event.
        if was_caught_up && self.pending_waiter.load(Ordering::SeqCst) {
            self.pending.notify_waiters();
        }
    }

    /// Appends an event without ever waiting on the sidecar. A payload that
    /// does not fit drops the oldest queued payloads; lifecycle events are
    /// never dropped and always fit.
    pub(crate) fn push(&self, event: PluginEvent) -> Pushed {
        let size = cost(&event);
        let mut inbox = self.lock_inbox();
        if self.full(&inbox, size).is_none() {
            let (event, caught_up) = self.stamp(&mut inbox, event, size);
            let seq = event.seq;
            inbox.events.push(event);
            self.newest.store(seq, Ordering::Release);
            let spill = inbox.events.len() >= INBOX_SPILL;
            drop(inbox);
            if spill {
                // The stream side has not taken the inbox in for a while (a
                // stalled sidecar, or one far behind): move its events over
                // if nobody holds that side, so that the inbox and its spare
                // buffer do not each grow to the whole backlog. Never waits.
                match self.state.try_lock() {
                    Ok(mut st) => self.take_in(&mut st),
                    Err(std::sync::TryLockError::Poisoned(e)) => self.take_in(&mut e.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => {}
                }
            }
            self.announce(caught_up);
            return Pushed { seq, dropped: 0 };
        }
        drop(inbox);
        // Making room: forget acked events first, then drop the oldest
        // payloads, with both locks held (in their order) so that no other
        // push comes between; the inbox is taken in under them.
        let mut guard = self.lock_state();
        let st = &mut *guard;
        let mut inbox = self.lock_inbox();
        swap_in(st, &mut inbox);
        st.events.extend(st.spare.drain(..));
        let (mut dropped, mut for_budget) = (0, 0);
        while let Some(why) = self.full(&inbox, size) {
            if self.trim_acked(st, 1) == 1 {
                continue;
            }
            let Some(pos) = st.events.iter().position(|e| e.event.is_payload()) else {
                break;
            };
            if let Some(old) = st.events.remove(pos) {
                self.release(cost(&old.event));
                dropped += 1;
                for_budget += u64::from(why == Full::Budget);
            }
        }
        st.stats.dropped_overflow += dropped;
        st.stats.dropped_budget += for_budget;
        let (event, caught_up) = self.stamp(&mut inbox, event, size);
        let seq = event.seq;
        st.events.push_back(event);
        self.newest.store(seq, Ordering::Release);
        drop(inbox);
        drop(guard);
        self.announce(caught_up);
        Pushed { seq, dropped }
    }

    /// Records a cumulative ack. An ack beyond the last pushed event is
    /// clamped; an older one changes nothing. The events it covers are
    /// forgotten incrementally (here and on later calls). Returns the acked
    /// position.
    pub(crate) fn ack(&self, seq: u64) -> u64 {
        let mut st = self.lock();
        let seq = seq.min(self.newest.load(Ordering::Acquire));
        if seq > st.acked {
            st.acked = seq;
            st.last_ack_at = Instant::now();
            self.mark_progress();
            self.acked.store(seq, Ordering::SeqCst);
        }
        self.trim_acked(&mut st, TRIM_PER_ACK);
        st.acked
    }

    /// Forgets every acked event, [`TRIM_PER_HOLD`] per lock hold, and gives
    /// back the room a burst left once the queue holds a quarter of it or
    /// less. Called after an Ack that caught up, off the daemon's hot path:
    /// without it the acked events of a burst (and their bodies) would stay
    /// until later batches trimmed them. Returns whether it gave room back.
    pub(crate) fn forget_acked(&self) -> bool {
        loop {
            let mut st = self.lock();
            if self.trim_acked(&mut st, TRIM_PER_HOLD) < TRIM_PER_HOLD {
                let (len, capacity) = (st.events.len(), st.events.capacity());
                if capacity > MIN_KEPT_CAPACITY && len < capacity / 4 {
                    st.events.shrink_to((len * 2).max(MIN_KEPT_CAPACITY));
                    st.spare.shrink_to(MIN_KEPT_CAPACITY);
                    let mut inbox = self.lock_inbox();
                    let keep = inbox.events.len().max(MIN_KEPT_CAPACITY);
                    inbox.events.shrink_to(keep);
                    return true;
                }
                return false;
            }
        }
    }

    /// The acked position.
    pub(crate) fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Marks the start of a new stream that resumes after the last ack and
    /// returns its cursor. Events it gets again count as replayed.
    pub(crate) fn open_stream(&self) -> u64 {
        let mut st = self.lock();
        let (acked, sent) = (st.acked, st.sent);
        let replays = st
            .events
            .iter()
            .filter(|e| e.seq > acked && e.seq <= sent)
            .count();
        st.stats.replayed += replays as u64;
        self.mark_progress();
        st.acked
    }

    /// Events after `cursor`, one batch bounded by `max_events` and
    /// `max_bytes` of body (at least one event when any is waiting). As
    /// many acked events as it sends, and a few more, are forgotten, so
    /// forgetting keeps up with delivery.
    ///
    /// The lock is held only to clone a few events at a time (reference
    /// counts, no copies), and they are written to the wire after it is
    /// released, so an ack or a push making room never waits long.
    pub(crate) fn batch_after(
        &self,
        cursor: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Vec<SequencedEvent> {
        const CLONES_PER_LOCK: usize = 32;
        let mut picked: Vec<SequencedEvent> = Vec::new();
        let mut bytes = 0;
        // Acked events need no sending, and may be forgotten already.
        let mut after = cursor.max(self.acked());
        'fill: loop {
            let st = self.lock();
            let start = st.events.partition_point(|e| e.seq <= after);
            let before = picked.len();
            for ev in st.events.range(start..).take(CLONES_PER_LOCK) {
                if !picked.is_empty()
                    && (picked.len() >= max_events || bytes + ev.event.body_len() > max_bytes)
                {
                    break 'fill;
                }
                bytes += ev.event.body_len();
                picked.push(ev.clone());
            }
            if picked.len() == before || picked.len() >= max_events {
                break;
            }
            after = picked.last().map_or(after, |e| e.seq);
            drop(st);
        }
        if let Some(last) = picked.last() {
            let mut st = self.lock();
            st.sent = st.sent.max(last.seq);
            st.stats.delivered += picked.len() as u64;
            self.trim_acked(&mut st, picked.len() + TRIM_PER_BATCH);
        }
        picked
    }

    /// Waits until an event after `cursor` may be there; may return
    /// spuriously. Returns at once if one is.
    ///
    /// A caught-up stream parks at once. Spinning first (yielding to the
    /// runtime a few times, so that a burst's next push finds the stream
    /// awake and need not ring the doorbell) was measured and dropped: at
    /// 1,000/s the spins found nothing and cost a quarter of the CPU per
    /// delivery, at 64,000/s they raised the median latency (likely
    /// because, on two CPUs, a spinning worker takes a CPU that the
    /// sidecar or the producer needs), and in bursts they saved nothing
    /// measurable (docs/BENCHMARKS.md, "A caught-up stream parks at once").
    ///
    /// A cursor behind the acked position (a client that acked events it
    /// was not sent yet) counts as at it: those events are not waited for,
    /// and their being forgotten does not make the stream spin.
    pub(crate) async fn wait_after(&self, cursor: u64, listener: &Listener) {
        listener
            .wait(&self.bell, || {
                self.newest.load(Ordering::Acquire) > cursor.max(self.acked())
            })
            .await;
    }

    /// What a stream waits with in [`wait_after`](Self::wait_after),
    /// registered with the runtime it is called on. Fails only when no
    /// descriptor can be opened.
    pub(crate) fn listener(&self) -> std::io::Result<Listener> {
        self.bell.listener()
    }

    /// Wakes a waiting stream (for example, so it notices it was superseded).
    pub(crate) fn wake(&self) {
        self.bell.ring();
    }

    /// The sequence number of the newest event, 0 when none was pushed.
    pub(crate) fn last_seq(&self) -> u64 {
        self.newest.load(Ordering::Acquire)
    }

    /// Time since the ack position last moved.
    pub(crate) fn last_ack_age(&self) -> Duration {
        self.lock().last_ack_at.elapsed()
    }

    /// Resolves once an event is pending (at once if one is).
    pub(crate) async fn until_pending(&self) {
        let notified = self.pending.notified();
        tokio::pin!(notified);
        // Registered, and said so, before the check: a push in between
        // still wakes it.
        notified.as_mut().enable();
        self.pending_waiter.store(true, Ordering::SeqCst);
        // Cleared however this ends, a drop included.
        let _waiting = ClearOnDrop(&self.pending_waiter);
        if self.stalled().is_none() {
            notified.await;
        }
    }

    /// The oldest unacked seq and how long the sidecar has made no progress
    /// on it; `None` when nothing is pending.
    pub(crate) fn stalled(&self) -> Option<(u64, Duration)> {
        let st = self.lock();
        let first = st.events.partition_point(|e| e.seq <= st.acked);
        let progress = Duration::from_nanos(self.last_progress.load(Ordering::Relaxed));
        st.events
            .get(first)
            .map(|e| (e.seq, self.created.elapsed().saturating_sub(progress)))
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> QueueStats {
        let st = self.lock();
        let acked_kept = st.events.partition_point(|e| e.seq <= st.acked);
        // With both locks held nothing moves: one consistent snapshot, the
        // events pushed since the inbox was taken in included.
        let inbox = self.lock_inbox();
        QueueStats {
            pushed: inbox.next_seq - 1,
            acked_seq: st.acked,
            depth: st.events.len() - acked_kept + inbox.events.len(),
            bytes: inbox.charged - self.released_bytes.load(Ordering::Relaxed),
            ..st.stats
        }
    }

    /// Forgets up to `limit` acked events from the front; returns how many.
    fn trim_acked(&self, st: &mut State, limit: usize) -> usize {
        let mut n = 0;
        while n < limit && st.events.front().is_some_and(|e| e.seq <= st.acked) {
            if let Some(old) = st.events.pop_front() {
                self.release(cost(&old.event));
            }
            n += 1;
        }
        n
    }
}

/// Swaps the inbox's buffer for the stream side's empty spare, so that the
/// spare holds the events pushed since the last swap.
fn swap_in(st: &mut State, inbox: &mut Inbox) {
    if !inbox.events.is_empty() {
        std::mem::swap(&mut inbox.events, &mut st.spare);
    }
}

/// Acked events forgotten per ack, and per batch beyond the batch's own
/// count: enough to keep up, few enough to keep every lock hold short.
const TRIM_PER_ACK: usize = 256;
const TRIM_PER_BATCH: usize = 4;

/// Acked events `forget_acked` forgets per lock hold.
const TRIM_PER_HOLD: usize = 64;

/// Room for events the queue keeps however empty it gets.
const MIN_KEPT_CAPACITY: usize = 1024;

/// Events in the inbox after which a push moves them to the stream side
/// when it can do so without waiting.
const INBOX_SPILL: usize = 1024;

/// Sets its flag to false when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A payload event for `kind`, borrowing the kind from `static_kinds` when it
/// is one of them so that the hot path does not allocate.
pub(crate) fn intern_kind(kind: &str, static_kinds: &'static [&'static str]) -> Cow<'static, str> {
    match static_kinds.iter().find(|k| **k == kind) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(kind.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::tests::poll_once;
    use bytes::Bytes;
    use pim_core::NodeId;

    fn payload(n: u8, len: usize) -> PluginEvent {
        PluginEvent::Payload {
            src: NodeId::from_bytes([n; 16]),
            kind: Cow::Borrowed("t.k"),
            body: Bytes::from(vec![n; len]),
        }
    }

    fn seqs(batch: &[SequencedEvent]) -> Vec<u64> {
        batch.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn batches_follow_the_cursor_and_acks_trim() {
        let q = EventQueue::new(QueueLimits::default());
        for i in 0..5 {
            assert_eq!(q.push(payload(i, 10)).seq, u64::from(i) + 1);
        }
        assert_eq!(seqs(&q.batch_after(0, 2, usize::MAX)), [1, 2]);
        assert_eq!(seqs(&q.batch_after(2, 10, usize::MAX)), [3, 4, 5]);
        assert_eq!(q.ack(3), 3);
        assert_eq!(q.ack(1), 3, "an older ack changes nothing");
        assert_eq!(q.stats().depth, 2);
        assert_eq!(q.ack(99), 5, "an ack past the end is clamped");
        assert_eq!(q.stats().bytes, 0);
    }

    /// After a burst is acked, its events and their room are given back.
    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let q = EventQueue::new(QueueLimits::default());
        {
            // The stream side busy all along: the inbox cannot be moved
            // over, and grows.
            let _busy = q.state.lock().unwrap();
            for i in 0..5_000u32 {
                q.push(payload((i % 256) as u8, 64));
            }
            assert!(q.lock_inbox().events.capacity() >= 5_000);
        }
        for i in 5_000..60_000u32 {
            q.push(payload((i % 256) as u8, 64));
        }
        let burst_capacity = q.lock().events.capacity();
        assert!(burst_capacity >= 60_000);
        q.ack(60_000);
        assert!(!q.lock().events.is_empty(), "an ack alone trims a little");
        assert!(q.forget_acked(), "the room is given back");
        assert!(!q.forget_acked(), "once");
        assert_eq!(q.stats().bytes, 0);
        let st = q.lock();
        assert_eq!(st.events.len(), 0);
        assert!(
            st.events.capacity() <= 2 * MIN_KEPT_CAPACITY,
            "{} of {burst_capacity}",
            st.events.capacity()
        );
        assert!(
            st.spare.capacity() <= MIN_KEPT_CAPACITY,
            "{}",
            st.spare.capacity()
        );
        drop(st);
        let inbox = q.lock_inbox().events.capacity();
        assert!(inbox <= MIN_KEPT_CAPACITY, "{inbox}");
    }

    /// With nobody reading, the inbox does not hold the backlog: pushes move
    /// it to the stream side, so the queue's bookkeeping is one copy of it.
    #[test]
    fn an_unread_queue_keeps_its_inbox_small() {
        let q = EventQueue::new(QueueLimits::default());
        for i in 0..20_000u32 {
            q.push(payload((i % 256) as u8, 8));
        }
        let inbox = q.lock_inbox().events.capacity();
        assert!(inbox <= 2 * INBOX_SPILL, "inbox room {inbox}");
        let st = q.lock();
        assert_eq!(st.events.len(), 20_000);
        assert!(
            st.spare.capacity() <= 2 * INBOX_SPILL,
            "spare room {}",
            st.spare.capacity()
        );
    }

    #[test]
    fn a_new_stream_replays_after_the_last_ack() {
        let q = EventQueue::new(QueueLimits::default());
        for i in 0..4 {
            q.push(payload(i, 1));
        }
        let _ = q.batch_after(q.open_stream(), 10, usize::MAX);
        q.ack(2);
        let cursor = q.open_stream();
        assert_eq!(cursor, 2);
        assert_eq!(seqs(&q.batch_after(cursor, 10, usize::MAX)), [3, 4]);
        assert_eq!(q.stats().replayed, 2);
    }

    #[test]
    fn overflow_drops_oldest_payloads_but_never_lifecycle_events() {
        let q = EventQueue::new(QueueLimits {
            max_events: 3,
            max_bytes: usize::MAX,
        });
        q.push(PluginEvent::PeerForgotten {
            node: NodeId::from_bytes([0; 16]),
        });
        q.push(payload(1, 1));
        q.push(payload(2, 1));
        assert_eq!(q.push(payload(3, 1)).dropped, 1);
        assert_eq!(seqs(&q.batch_after(0, 10, usize::MAX)), [1, 3, 4]);
        q.push(PluginEvent::Shutdown {
            grace: Duration::from_secs(1),
        });
        q.push(PluginEvent::Shutdown {
            grace: Duration::from_secs(1),
        });
        // Only lifecycle events left to keep: they all stay.
        q.push(PluginEvent::Shutdown {
            grace: Duration::from_secs(1),
        });
        assert_eq!(seqs(&q.batch_after(0, 10, usize::MAX)), [1, 5, 6, 7]);
        assert_eq!(q.stats().dropped_overflow, 3);
    }

    #[test]
    fn the_byte_bound_holds() {
        let limits = QueueLimits {
            max_events: usize::MAX,
            max_bytes: 10 * (1000 + 3 + EVENT_OVERHEAD_BYTES),
        };
        let q = EventQueue::new(limits);
        for i in 0..100 {
            q.push(payload(i, 1000));
            assert!(q.stats().bytes <= limits.max_bytes);
        }
        assert_eq!(q.stats().depth, 10);
        assert_eq!(q.stats().dropped_overflow, 90);
    }

    #[test]
    fn batches_respect_the_byte_budget_but_never_starve() {
        let q = EventQueue::new(QueueLimits::default());
        q.push(payload(1, 100));
        q.push(payload(2, 100));
        assert_eq!(seqs(&q.batch_after(0, 10, 150)), [1]);
        assert_eq!(
            seqs(&q.batch_after(0, 10, 10)),
            [1],
            "one event always fits"
        );
    }

    #[test]
    fn a_large_ack_is_forgotten_incrementally_and_never_counts_as_a_drop() {
        let q = EventQueue::new(QueueLimits {
            max_events: 2_000,
            max_bytes: usize::MAX,
        });
        for i in 0..2_000 {
            q.push(payload(i as u8, 10));
        }
        q.ack(2_000);
        let st = q.stats();
        assert_eq!(
            (st.depth, st.acked_seq),
            (0, 2_000),
            "acked events are not pending"
        );
        // A full queue of acked events makes room without dropping anything.
        for i in 0..2_000 {
            q.push(payload(i as u8, 10));
        }
        assert_eq!(q.stats().dropped_overflow, 0);
        assert_eq!(q.stats().depth, 2_000);
        q.ack(4_000);
        for _ in 0..20 {
            q.ack(4_000);
        }
        assert_eq!(q.stats().bytes, 0, "every acked event was forgotten");
        assert_eq!(q.stalled(), None);
    }

    #[test]
    fn a_flooded_queue_cannot_take_a_neighbours_share_of_the_budget() {
        let size = 1000 + 3 + EVENT_OVERHEAD_BYTES;
        let budget = QueueBudget::new(20 * size);
        let own = QueueLimits {
            max_events: 1000,
            max_bytes: usize::MAX,
        };
        let flooded = EventQueue::with_budget(own, Some(budget.clone()));
        let quiet = EventQueue::with_budget(own, Some(budget.clone()));
        // Nobody reads the flooded queue: it takes all the free room, then
        // drops its own oldest payloads to stay within the budget.
        for _ in 0..100 {
            flooded.push(payload(1, 1000));
        }
        assert_eq!(budget.used(), 20 * size, "{budget:?}");
        assert_eq!(flooded.stats().dropped_budget, 80);
        assert_eq!(flooded.stats().dropped_overflow, 80);
        // Its neighbour, within its share (10 events' worth), loses nothing
        // although the budget is full.
        for _ in 0..10 {
            assert_eq!(quiet.push(payload(2, 1000)).dropped, 0);
        }
        assert_eq!(quiet.stats().depth, 10);
        // Above its share, the neighbour sheds its own oldest, not the
        // flooded queue's.
        let before = flooded.stats().depth;
        assert_eq!(quiet.push(payload(2, 1000)).dropped, 1);
        assert_eq!(flooded.stats().depth, before);
        // The flooded queue gives the borrowed room back on its next push.
        flooded.push(payload(1, 1000));
        assert!(flooded.stats().bytes <= 10 * size, "{:?}", flooded.stats());
        assert!(budget.used() <= 20 * size, "{budget:?}");
        // Lifecycle events are never dropped, budget or not.
        flooded.push(PluginEvent::PeerForgotten {
            node: NodeId::from_bytes([0; 16]),
        });
        assert!(flooded
            .batch_after(0, 1000, usize::MAX)
            .iter()
            .any(|e| matches!(e.event, PluginEvent::PeerForgotten { .. })));
    }

    #[test]
    fn acks_and_dropped_queues_give_the_budget_back() {
        let budget = QueueBudget::new(1 << 20);
        let q = EventQueue::with_budget(QueueLimits::default(), Some(budget.clone()));
        let other = EventQueue::with_budget(QueueLimits::default(), Some(budget.clone()));
        for _ in 0..50 {
            q.push(payload(1, 500));
            other.push(payload(2, 500));
        }
        assert_eq!(budget.used(), q.stats().bytes + other.stats().bytes);
        q.ack(50);
        q.forget_acked();
        assert_eq!(budget.used(), other.stats().bytes);
        drop(other);
        assert_eq!(budget.used(), 0);
        assert_eq!(q.stats().dropped_budget, 0);
    }

    /// Producers on several threads, a stream taking batches and acking on
    /// another: every event arrives once and in order; with bounds small
    /// enough that pushes must make room, in order, and every event that
    /// did not arrive was counted as dropped (a dropped event may have been
    /// sent before its ack).
    #[test]
    fn concurrent_pushes_reach_the_stream_in_order_or_are_counted_dropped() {
        const PER_PRODUCER: usize = 20_000;
        let total = 3 * PER_PRODUCER as u64;
        for max_events in [usize::MAX, 64] {
            let q = Arc::new(EventQueue::new(QueueLimits {
                max_events,
                max_bytes: usize::MAX,
            }));
            let producers: Vec<_> = (0..3)
                .map(|p| {
                    let q = q.clone();
                    std::thread::spawn(move || {
                        for _ in 0..PER_PRODUCER {
                            q.push(payload(p, 8));
                        }
                    })
                })
                .collect();
            let (mut cursor, mut received) = (0, 0u64);
            while cursor < total {
                let batch = q.batch_after(cursor, 16, usize::MAX);
                for seq in seqs(&batch) {
                    assert!(seq > cursor, "{seq} after {cursor}");
                    cursor = seq;
                    received += 1;
                }
                q.ack(cursor);
                if batch.is_empty() || cursor % 2048 < 16 {
                    // Now and then a slow consumer: the inbox passes the
                    // spill mark and pushes move it over meanwhile.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            for p in producers {
                p.join().unwrap();
            }
            let st = q.stats();
            assert_eq!(st.pushed, total);
            if max_events == usize::MAX {
                assert_eq!((received, st.dropped_overflow), (total, 0), "{st:?}");
            } else {
                assert!(st.dropped_overflow > 0, "{st:?}");
                assert!(received + st.dropped_overflow >= total, "{received} {st:?}");
            }
            q.forget_acked();
            assert_eq!(q.stats().bytes, 0);
        }
    }

    /// A caught-up stream arms the doorbell at its first poll and sleeps
    /// until the next push; it does not wait when an event is there.
    #[tokio::test]
    async fn a_caught_up_stream_parks_at_once_and_a_push_wakes_it() {
        let q = EventQueue::new(QueueLimits::default());
        let listener = q.listener().expect("an eventfd");
        let cursor = q.last_seq();
        let wait = q.wait_after(cursor, &listener);
        tokio::pin!(wait);
        assert!(!poll_once(wait.as_mut()).await, "no event yet");
        assert!(q.bell.is_armed(), "parked at the first poll");
        assert!(!poll_once(wait.as_mut()).await, "still parked");
        q.push(payload(1, 8));
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the push wakes the parked stream");
        let at_once = q.wait_after(cursor, &listener);
        tokio::pin!(at_once);
        assert!(
            poll_once(at_once.as_mut()).await,
            "an event after the cursor is there: no wait"
        );
    }

    /// A client may ack events it was not sent yet; once they are
    /// forgotten, its stream has nothing to send and must park, not find
    /// "an event after the cursor" forever (which spun a worker).
    #[tokio::test]
    async fn a_stream_behind_an_ack_of_unsent_events_parks() {
        let q = EventQueue::new(QueueLimits::default());
        let listener = q.listener().expect("an eventfd");
        let cursor = q.open_stream();
        for n in 1..=3 {
            q.push(payload(n, 8));
        }
        assert_eq!(q.ack(q.last_seq()), 3, "acked before they were sent");
        q.forget_acked();
        assert!(
            q.batch_after(cursor, 256, 1 << 20).is_empty(),
            "nothing left to send"
        );
        let wait = q.wait_after(cursor, &listener);
        tokio::pin!(wait);
        assert!(!poll_once(wait.as_mut()).await, "parks");
        q.push(payload(4, 8));
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the next push wakes it");
        assert_eq!(seqs(&q.batch_after(cursor, 256, 1 << 20)), [4]);
    }

    #[test]
    fn kinds_are_interned() {
        static KINDS: &[&str] = &["a.b", "a.c"];
        assert!(matches!(intern_kind("a.c", KINDS), Cow::Borrowed("a.c")));
        assert!(matches!(intern_kind("zz", KINDS), Cow::Owned(_)));
    }
}
