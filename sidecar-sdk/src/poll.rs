//! Waiting for a host call's answer by polling for a short while before
//! sleeping.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Runs `fut` to completion, busy-polling for up to `budget` first: while
/// `fut` is pending and less than `budget` has passed, this yields to the
/// runtime instead of letting it sleep, so that the runtime's other tasks
/// run and its sockets are polled again at once; after `budget` it waits
/// as usual. [`HostClient`](crate::HostClient) port calls use it; it serves
/// any call whose answer is expected within microseconds.
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
    let start = Instant::now();
    loop {
        let polled = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        if let Some(v) = polled {
            return v;
        }
        if start.elapsed() >= budget {
            return fut.await;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::busy_poll;

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
}
