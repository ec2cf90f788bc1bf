//! Tasks of the socket server that wake themselves while they run are
//! polled again at once, instead of going back to the runtime.
//!
//! hyper drives each HTTP/2 stream in a task of its own, and h2 wakes that
//! task in the middle of its own poll whenever it sends: the task stores its
//! waker to hear of a reset, then asks for one byte of send capacity, which
//! h2 grants at once by waking the stored waker, itself. A task woken while
//! it runs is rescheduled by tokio's work-stealing runtime as a yield, and a
//! yield wakes a parked worker to steal it: one more thread woken (a futex
//! write and a context switch) for every batch of events and every port
//! call's answer, which a single-threaded runtime does not pay.
//!
//! [`Repoll`] gives the task it wraps a waker of its own. A wake that comes
//! while the task is being polled, from its own thread or another, only
//! marks it, and the task is polled again before [`Repoll`] returns; a wake
//! that comes while it is not being polled wakes the runtime's task as
//! usual. At most [`REPOLLS`] polls are made in a row, so a task that always
//! wakes itself still goes back to the runtime and lets others run.
//! tokio's own cooperative yields are not affected: it defers the wakes of
//! `yield_now` and of an exhausted budget until the poll has returned. A
//! future that yields by waking itself and returning `Pending` (hyper's
//! keepalive timer does, when its deadline has passed) is polled up to
//! [`REPOLLS`] times before it goes back to the runtime: bounded, and
//! cheaper than the thread a yield would wake.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// The task is being polled.
const POLLING: u8 = 1;
/// The task was woken and has not been polled since.
const WOKEN: u8 = 2;
/// The task has finished: wakes do nothing.
const DONE: u8 = POLLING | WOKEN;

/// Most polls of the wrapped task in one poll of [`Repoll`].
pub(crate) const REPOLLS: usize = 8;

/// What the wrapped task's waker shares with [`Repoll`].
struct Shared {
    /// `POLLING` and `WOKEN` bits.
    state: AtomicU8,
    /// The runtime's waker of the task, from its latest poll.
    outer: Mutex<Option<Waker>>,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Being polled: the poller sees the mark and polls again. Already
        // woken: the runtime has the task queued. Finished: nothing to do.
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) != 0 {
            return;
        }
        let outer = self.outer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(waker) = outer {
            waker.wake();
        }
    }
}

/// A future polled again at once when it wakes itself during its poll (see
/// the module's text).
pub(crate) struct Repoll<F> {
    future: Pin<Box<F>>,
    shared: Arc<Shared>,
    waker: Waker,
}

impl<F: Future> Repoll<F> {
    /// Wraps `future`.
    pub(crate) fn new(future: F) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(0),
            outer: Mutex::new(None),
        });
        Self {
            future: Box::pin(future),
            waker: Waker::from(shared.clone()),
            shared,
        }
    }
}

impl<F: Future> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut outer = this.shared.outer.lock().unwrap_or_else(|e| e.into_inner());
            if !outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *outer = Some(cx.waker().clone());
            }
        }
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..REPOLLS {
            // Clears a `WOKEN` from before: this poll answers it (and, by
            // acquiring, sees what its waker published before waking).
            this.shared.state.swap(POLLING, Ordering::AcqRel);
            if let Poll::Ready(output) = this.future.as_mut().poll(&mut inner) {
                // Wakers still held elsewhere find it finished and do not
                // keep the runtime's task alive.
                this.shared.state.store(DONE, Ordering::Release);
                this.shared
                    .outer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                return Poll::Ready(output);
            }
            // Not woken during the poll: the next wake goes to the runtime.
            if this
                .shared
                .state
                .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Woken during each of its polls: back to the runtime, still woken.
        this.shared.state.store(WOKEN, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Spawns `future` on the current runtime, wrapped in [`Repoll`].
pub(crate) fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(Repoll::new(future))
}

/// hyper's executor for the socket server's per-stream tasks: [`spawn`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        spawn(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Counting {
        fn wakes(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A future that, on each of its first `self_wakes` polls, wakes itself
    /// with `wake` (given its own waker) and returns `Pending`; then it is
    /// pending without waking, keeping its waker.
    struct Wakes<W> {
        self_wakes: usize,
        polls: Arc<AtomicUsize>,
        kept: Arc<Mutex<Option<Waker>>>,
        wake: W,
    }

    impl<W: Fn(&Waker) + Unpin> Future for Wakes<W> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.kept.lock().unwrap() = Some(cx.waker().clone());
            if self.self_wakes > 0 {
                self.self_wakes -= 1;
                (self.wake)(cx.waker());
            }
            Poll::Pending
        }
    }

    type Probe<W> = (
        Repoll<Wakes<W>>,
        Arc<AtomicUsize>,
        Arc<Mutex<Option<Waker>>>,
    );

    fn wakes<W: Fn(&Waker) + Unpin>(self_wakes: usize, wake: W) -> Probe<W> {
        let polls = Arc::new(AtomicUsize::new(0));
        let kept = Arc::new(Mutex::new(None));
        let future = Wakes {
            self_wakes,
            polls: polls.clone(),
            kept: kept.clone(),
            wake,
        };
        (Repoll::new(future), polls, kept)
    }

    fn poll_once<F: Future>(future: &mut Repoll<F>, outer: &Arc<Counting>) -> Poll<F::Output> {
        let waker = Waker::from(outer.clone());
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_task_that_wakes_itself_while_it_runs_is_polled_again_without_the_runtime() {
        let outer = Arc::new(Counting::default());
        let (mut future, polls, _) = wakes(3, Waker::wake_by_ref);
        assert!(poll_once(&mut future, &outer).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            4,
            "three self-wakes, four polls"
        );
        assert_eq!(outer.wakes(), 0, "the runtime was never woken");
    }

    #[test]
    fn a_wake_from_another_thread_during_the_poll_is_answered_by_polling_again() {
        let outer = Arc::new(Counting::default());
        let (mut future, polls, _) = wakes(1, |w: &Waker| {
            let w = w.clone();
            std::thread::spawn(move || w.wake()).join().unwrap();
        });
        assert!(poll_once(&mut future, &outer).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert_eq!(outer.wakes(), 0);
    }

    #[test]
    fn a_wake_between_polls_wakes_the_runtime_once_until_the_next_poll() {
        let outer = Arc::new(Counting::default());
        let (mut future, polls, kept) = wakes(0, Waker::wake_by_ref);
        assert!(poll_once(&mut future, &outer).is_pending());
        let inner = kept.lock().unwrap().clone().expect("polled");
        inner.wake_by_ref();
        inner.wake_by_ref();
        assert_eq!(
            outer.wakes(),
            1,
            "a second wake before the poll adds nothing"
        );
        assert!(poll_once(&mut future, &outer).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        inner.wake();
        assert_eq!(
            outer.wakes(),
            2,
            "after the poll a wake reaches the runtime again"
        );
    }

    #[test]
    fn a_task_that_always_wakes_itself_still_goes_back_to_the_runtime() {
        let outer = Arc::new(Counting::default());
        let (mut future, polls, _) = wakes(usize::MAX, Waker::wake_by_ref);
        assert!(poll_once(&mut future, &outer).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), REPOLLS);
        assert_eq!(
            outer.wakes(),
            1,
            "woken, so that the runtime polls it again"
        );
        assert!(poll_once(&mut future, &outer).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2 * REPOLLS);
        assert_eq!(outer.wakes(), 2);
    }

    #[test]
    fn the_output_comes_through_and_the_latest_runtime_waker_is_the_one_woken() {
        let (first, second) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let (mut future, _, kept) = wakes(0, Waker::wake_by_ref);
        assert!(poll_once(&mut future, &first).is_pending());
        assert!(poll_once(&mut future, &second).is_pending());
        kept.lock().unwrap().clone().expect("polled").wake();
        assert_eq!((first.wakes(), second.wakes()), (0, 1));
        let mut ready = Repoll::new(std::future::ready(7));
        assert_eq!(poll_once(&mut ready, &first), Poll::Ready(7));
    }

    #[test]
    fn a_finished_task_is_not_woken_and_its_runtime_waker_is_let_go() {
        struct PendingOnce(Option<Arc<Mutex<Option<Waker>>>>);
        impl Future for PendingOnce {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                match self.0.take() {
                    Some(kept) => {
                        *kept.lock().unwrap() = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    None => Poll::Ready(()),
                }
            }
        }
        let outer = Arc::new(Counting::default());
        let kept = Arc::new(Mutex::new(None));
        let mut future = Repoll::new(PendingOnce(Some(kept.clone())));
        assert!(poll_once(&mut future, &outer).is_pending());
        assert!(poll_once(&mut future, &outer).is_ready());
        assert_eq!(
            Arc::strong_count(&outer),
            1,
            "the runtime's waker was dropped"
        );
        kept.lock().unwrap().take().expect("polled").wake();
        assert_eq!(outer.wakes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spawned_tasks_that_wake_themselves_and_each_other_finish() {
        // A task woken by another task's send and by its own yields, on a
        // work-stealing runtime.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let consumer = spawn(async move {
            let mut sum = 0u64;
            while let Some(n) = rx.recv().await {
                sum += u64::from(n);
                tokio::task::yield_now().await;
            }
            sum
        });
        let producer = spawn(async move {
            for n in 0..1000 {
                tx.send(n).await.unwrap();
            }
        });
        producer.await.unwrap();
        assert_eq!(consumer.await.unwrap(), 999 * 1000 / 2);
    }
}
