//! Waiting for a host call's answer by polling for a short while before
//! sleeping.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Runs `fut` to completion, busy-polling for up to `budget` first: while
/// `fut` is pending and less than `budget` has passed, this yields to the
/// runtime instead of letting it sleep, so that the runtime's other tasks
/// run and its sockets are polled again at once; after `budget` it waits
/// as usual. [`HostClient`](crate::HostClient) port calls use it (and
/// stop using it while they find the host's thread on their own CPU: see
/// [`HostClient::with_busy_poll`](crate::HostClient::with_busy_poll)); it
/// serves any call whose answer is expected within microseconds.
///
/// Between polls the thread also yields its CPU to the kernel
/// (`sched_yield`). The write that sent the call woke the answering thread
/// as a *sync* wake-up, which places it on the writer's CPU on the
/// expectation that the writer sleeps next; a poll that kept the CPU would
/// hold that thread off until the budget ran out. Yielding lets it run
/// there at once, and costs a system call per poll.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// let answer = pim_sidecar::busy_poll(async { 42 }, Duration::from_micros(100)).await;
/// assert_eq!(answer, 42);
/// # }
/// ```
pub async fn busy_poll<F: Future>(fut: F, budget: Duration) -> F::Output {
    let mut fut = pin!(fut);
    if budget.is_zero() {
        return fut.await;
    }
    match poll_within(fut.as_mut(), budget).await {
        Some(v) => v,
        None => fut.await,
    }
}

/// Polls `fut` as [`busy_poll`] does until it is ready or `budget` has
/// passed; `None` then, with `fut` still pending. The thread never sleeps
/// here.
async fn poll_within<F: Future>(mut fut: Pin<&mut F>, budget: Duration) -> Option<F::Output> {
    let start = Instant::now();
    loop {
        let polled = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        if polled.is_some() {
            return polled;
        }
        if start.elapsed() >= budget {
            return None;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

/// Time off this thread's CPU during one busy poll, given to other
/// threads, beyond which the CPU is taken to be shared with the answering
/// thread.
const SHARED_CPU_NS: u64 = 20_000;

/// Calls that wait without polling once the CPU was found shared; the
/// next call after them polls, and measures, again.
const CALLS_UNPOLLED: u32 = 63;

/// One polled call in this many measures whether the CPU is shared (each
/// measurement reads the thread's CPU clock and `getrusage` before and
/// after: four system calls).
const MEASURE_EVERY: u32 = 8;

/// Decides, call by call, whether the port calls of one client busy-poll.
///
/// Polling pays when the host's thread answers on another CPU: this one
/// stays awake and sees the answer at once. When the two run on one CPU
/// (a machine with one free CPU, a kernel that packs light load onto one
/// CPU), polling only hands that CPU back and
/// forth: each yield lets the host's thread handle a part of the call in a
/// turn of its own, and the answer comes no sooner than if this thread had
/// slept (docs/BENCHMARKS.md, "One CPU at light load"). So a polled call
/// now and then measures whether, while it polled, this thread gave its
/// CPU to other threads (involuntary context switches, and time off its
/// CPU past [`SHARED_CPU_NS`]: the thread does not sleep while the call
/// polls, unless another task of its runtime blocks it). If it did, the
/// next [`CALLS_UNPOLLED`] calls wait without polling, and the one after
/// them polls and measures again.
#[derive(Debug, Default)]
pub(crate) struct PollGate {
    /// Calls left that wait without polling.
    unpolled: AtomicU32,
    /// Polled calls since the last measurement (0: measure the next).
    polled: AtomicU32,
}

impl PollGate {
    /// Awaits `fut`, busy-polling for up to `budget` first unless the CPU
    /// was found shared (see the type's text).
    pub(crate) async fn call<F: Future>(&self, fut: F, budget: Duration) -> F::Output {
        let mut fut = pin!(fut);
        if budget.is_zero() || self.take_unpolled() {
            return fut.await;
        }
        let measure = self.polled.fetch_add(1, Ordering::Relaxed) % MEASURE_EVERY == 0;
        // Small across the await: a port call's future is kept small.
        let before = if measure { ThreadUsage::now() } else { None };
        let polled = poll_within(fut.as_mut(), budget).await;
        if let (Some(before), Some(after)) = (before, before.and_then(|_| ThreadUsage::now())) {
            if after.gave_cpu_away_since(&before) {
                self.unpolled.store(CALLS_UNPOLLED, Ordering::Relaxed);
                // The call after the unpolled ones measures again.
                self.polled.store(0, Ordering::Relaxed);
            }
        }
        if let Some(v) = polled {
            return v;
        }
        fut.await
    }

    /// Takes one of the calls left to wait without polling, if any.
    fn take_unpolled(&self) -> bool {
        self.unpolled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// What the kernel counts for the calling thread.
#[derive(Debug, Clone, Copy)]
struct ThreadUsage {
    /// The thread (a task of a work-stealing runtime may move to another
    /// between two readings, which then compare nothing).
    tid: libc::pid_t,
    /// Monotonic time less the thread's CPU time, in ns: what grows while
    /// the thread is off its CPU.
    off_cpu_ns: u64,
    /// Involuntary context switches: preempted, or a `sched_yield` that
    /// ran another thread.
    switched_out: i64,
}

impl ThreadUsage {
    /// This thread's usage: `CLOCK_THREAD_CPUTIME_ID` (exact, where
    /// `getrusage`'s times lag behind a running thread), the monotonic
    /// clock, and `getrusage(RUSAGE_THREAD)`'s involuntary switches.
    /// `None` if the kernel does not say.
    fn now() -> Option<Self> {
        let ns = |clock: libc::clockid_t| {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid timespec for clock_gettime to write.
            if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
                return None;
            }
            u64::try_from(t.tv_sec)
                .ok()?
                .checked_mul(1_000_000_000)?
                .checked_add(u64::try_from(t.tv_nsec).ok()?)
        };
        let cpu_ns = ns(libc::CLOCK_THREAD_CPUTIME_ID)?;
        let now_ns = ns(libc::CLOCK_MONOTONIC)?;
        // SAFETY: rusage is plain data, for which all zeroes are valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid rusage for getrusage to write.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
            return None;
        }
        Some(Self {
            // SAFETY: gettid takes no arguments and cannot fail.
            tid: unsafe { libc::gettid() },
            off_cpu_ns: now_ns.saturating_sub(cpu_ns),
            switched_out: usage.ru_nivcsw,
        })
    }

    /// Whether, between `before` and this reading of the same thread, the
    /// thread was switched out and spent [`SHARED_CPU_NS`] or more off its
    /// CPU.
    fn gave_cpu_away_since(&self, before: &Self) -> bool {
        self.tid == before.tid
            && self.switched_out > before.switched_out
            && self.off_cpu_ns.saturating_sub(before.off_cpu_ns) >= SHARED_CPU_NS
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{busy_poll, PollGate, ThreadUsage, CALLS_UNPOLLED};

    /// A future that is ready at `at`, counting how often it was polled.
    async fn ready_at(at: Instant, polls: &AtomicUsize) {
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(at.into()));
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            sleep.as_mut().poll(cx)
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_budget_it_waits_like_await() {
        let polls = AtomicUsize::new(0);
        let at = Instant::now() + Duration::from_millis(2);
        busy_poll(ready_at(at, &polls), Duration::ZERO).await;
        assert_eq!(polls.load(Ordering::Relaxed), 2, "pending once, then ready");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn within_the_budget_it_polls_without_sleeping() {
        let polls = AtomicUsize::new(0);
        let at = Instant::now() + Duration::from_millis(2);
        busy_poll(ready_at(at, &polls), Duration::from_secs(5)).await;
        assert!(Instant::now() >= at);
        let n = polls.load(Ordering::Relaxed);
        assert!(
            n > 10,
            "a 2 ms wait inside the budget polled only {n} times"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn after_the_budget_it_sleeps_until_woken() {
        let polls = AtomicUsize::new(0);
        let started = Instant::now();
        let at = started + Duration::from_millis(50);
        busy_poll(ready_at(at, &polls), Duration::from_micros(200)).await;
        assert!(Instant::now() >= at);
        // Polled while the 200 µs lasted, then once more when the timer
        // fired: far fewer polls than 50 ms of polling would make.
        let within_budget = polls.load(Ordering::Relaxed);
        let polls_in_50ms = {
            let polls = AtomicUsize::new(0);
            let at = Instant::now() + Duration::from_millis(50);
            busy_poll(ready_at(at, &polls), Duration::from_secs(5)).await;
            polls.load(Ordering::Relaxed)
        };
        assert!(
            within_budget * 10 < polls_in_50ms,
            "{within_budget} polls with a 200 µs budget, {polls_in_50ms} polling all 50 ms"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_tasks_run_while_it_polls() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(7);
        });
        let got = busy_poll(rx, Duration::from_secs(5)).await;
        assert_eq!(got.ok(), Some(7));
    }

    /// The CPU the calling thread runs on.
    fn this_cpu() -> usize {
        // SAFETY: sched_getcpu takes no arguments.
        usize::try_from(unsafe { libc::sched_getcpu() }).expect("sched_getcpu")
    }

    /// Pins the calling thread to `cpu`.
    fn pin_to(cpu: usize) -> std::io::Result<()> {
        // SAFETY: cpu_set_t is plain data, for which all zeroes are valid.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is below the
        // machine's CPU count, well under CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is
        // the calling thread.
        match unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Held by each test that pins threads, so that one's threads do not
    /// share a CPU with another's.
    static PINNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Runs `test` on a thread of its own (so that pinning it leaves the
    /// test harness's threads alone), after the other pinning tests, when
    /// threads can be pinned here (see [`can_pin`]; `two`: and there are
    /// two CPUs).
    fn pinned(two: bool, test: impl FnOnce() + Send + 'static) {
        if !can_pin(two) {
            return;
        }
        let _alone = PINNING.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::spawn(test).join().unwrap();
    }

    /// Keeps this thread's CPU busy for `time`.
    fn spin(time: Duration) {
        let until = Instant::now() + time;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    /// Whether threads can be pinned to CPUs here (and, with `two`, whether
    /// there are two CPUs): if not, says why and the test is skipped,
    /// except under `CI=true`, where it fails.
    fn can_pin(two: bool) -> bool {
        let why = match std::thread::spawn(|| pin_to(this_cpu())).join().unwrap() {
            Err(e) => format!("threads cannot be pinned to a CPU here: {e}"),
            Ok(()) if two && std::thread::available_parallelism().map_or(1, usize::from) < 2 => {
                "this test needs two CPUs".to_owned()
            }
            Ok(()) => return true,
        };
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED: {why}");
        false
    }

    /// A call through `gate` whose answer comes from a thread pinned to
    /// `answer_on` after 300 µs of work there, with the calling thread
    /// pinned to the CPU it runs on; `answer_on` gets that CPU.
    fn a_call_answered_on(gate: &PollGate, answer_on: impl FnOnce(usize) -> usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cpu = this_cpu();
        pin_to(cpu).unwrap();
        let answer_cpu = answer_on(cpu);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let polling = Arc::new(AtomicBool::new(false));
        let started = polling.clone();
        let answering = std::thread::spawn(move || {
            pin_to(answer_cpu).unwrap();
            // Once the call polls, work for 300 µs, as a host handling the
            // call, and answer.
            while !started.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            spin(Duration::from_micros(300));
            let _ = tx.send(());
        });
        let call = async {
            polling.store(true, Ordering::Release);
            rx.await
        };
        runtime
            .block_on(gate.call(call, Duration::from_secs(5)))
            .unwrap();
        answering.join().unwrap();
    }

    #[test]
    fn calls_stop_polling_while_the_answering_thread_shares_this_cpu() {
        pinned(false, || {
            let gate = PollGate::default();
            a_call_answered_on(&gate, |this| this);
            assert_eq!(
                gate.unpolled.load(Ordering::Relaxed),
                CALLS_UNPOLLED,
                "a call answered by a thread on this CPU while it polled"
            );
            // The next calls wait without polling, then one polls and
            // measures again.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for left in (0..CALLS_UNPOLLED).rev() {
                runtime.block_on(gate.call(async {}, Duration::from_secs(5)));
                assert_eq!(gate.unpolled.load(Ordering::Relaxed), left);
            }
            assert_eq!(
                gate.polled.load(Ordering::Relaxed),
                0,
                "the next call measures"
            );
        });
    }

    #[test]
    fn calls_keep_polling_when_the_answer_comes_from_another_cpu() {
        pinned(true, || {
            // Another process's or test's thread may share this CPU for a
            // moment and turn one measurement (the gate then rightly stops
            // polling); twenty calls in a row are not all turned unless the
            // machine is saturated.
            let kept_polling = (0..20).any(|_| {
                let gate = PollGate::default();
                a_call_answered_on(&gate, |this| usize::from(this == 0));
                gate.unpolled.load(Ordering::Relaxed) == 0
            });
            assert!(
                kept_polling,
                "twenty calls answered from another CPU all found this one shared"
            );
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_budget_the_gate_neither_polls_nor_measures() {
        let gate = PollGate::default();
        let polls = AtomicUsize::new(0);
        let at = Instant::now() + Duration::from_millis(2);
        gate.call(ready_at(at, &polls), Duration::ZERO).await;
        assert_eq!(polls.load(Ordering::Relaxed), 2, "pending once, then ready");
        assert_eq!(gate.polled.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_threads_usage_counts_the_time_a_yield_gave_another_thread() {
        pinned(false, || {
            let cpu = this_cpu();
            pin_to(cpu).unwrap();
            let before = ThreadUsage::now().expect("the thread's usage");
            let other = std::thread::spawn(move || {
                pin_to(cpu).unwrap();
                spin(Duration::from_micros(300));
            });
            while !other.is_finished() {
                std::thread::yield_now();
            }
            let after = ThreadUsage::now().expect("the thread's usage");
            other.join().unwrap();
            assert!(after.switched_out > before.switched_out);
            let off_cpu = after.off_cpu_ns - before.off_cpu_ns;
            // The other thread's 300 µs ran while this one yielded.
            assert!(
                off_cpu >= 200_000,
                "{off_cpu} ns off the CPU while another thread spun 300 µs on it"
            );
            assert!(after.gave_cpu_away_since(&before));
            assert!(!before.gave_cpu_away_since(&before));
        });
    }
}
