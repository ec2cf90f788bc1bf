//! How a push wakes the Events stream: an eventfd that the push rings and
//! the stream waits on through its runtime's I/O driver.
//!
//! Why not a `tokio::sync::Notify`: a waker called from outside a
//! work-stealing runtime (the daemon's thread, in `handle_payload`) puts the
//! task in the runtime's shared queue and unparks a worker; that worker,
//! the last one searching for work when it finds the task, unparks another,
//! which finds nothing and parks again. Two thread wake-ups per event at
//! light load, the second on the CPU the sidecar needs next. An I/O event
//! wakes only the worker that polls the driver, and the task it wakes runs
//! there (docs/BENCHMARKS.md, "The stream's wake-up, and where the Python
//! gap is").

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The producers' side: rung after an event is published, when a waiting
/// stream armed it.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    /// The eventfd, opened by the first listener.
    fd: OnceLock<File>,
    /// Set by a stream about to wait; cleared by the ring that wakes it.
    armed: AtomicBool,
}

impl Doorbell {
    /// Rings if a stream armed the bell since the last ring. Call after the
    /// event it announces is visible to the stream's check.
    pub(crate) fn ring_if_armed(&self) {
        // Pairs with the fence in `Listener::wait`: either this sees the
        // flag, or the stream's check after its fence sees the event.
        fence(Ordering::SeqCst);
        // Acquire: a flag set by a listener comes with the descriptor it
        // opened.
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Acquire) {
            self.ring();
        }
    }

    /// Whether a stream armed the bell and no ring has cleared it since.
    #[cfg(test)]
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Rings, armed or not (to make a waiting stream look again).
    pub(crate) fn ring(&self) {
        if let Some(mut fd) = self.fd.get() {
            // Every write is an edge for every registration, whatever the
            // count (which nobody reads: see `Listener::wait`). A write of
            // 1 would fail only at a count one short of 2^64, more writes
            // than a daemon makes.
            let _ = fd.write(&1u64.to_ne_bytes());
        }
    }

    /// A listener for one stream, registered with the I/O driver of the
    /// runtime it is called on. Fails when no descriptor can be opened.
    pub(crate) fn listener(&self) -> std::io::Result<Listener> {
        let fd = match self.fd.get() {
            Some(fd) => fd,
            None => {
                // Two streams opening at once may both open one; either
                // will do, and the other is closed.
                let _ = self.fd.set(eventfd()?);
                self.fd
                    .get()
                    .expect("set just above, by this call or another")
            }
        };
        // Each listener registers its own duplicate (one descriptor cannot
        // be registered twice with one epoll instance).
        let own = fd.try_clone()?;
        // Deprecated in recent tokio releases because any `AsRawFd` could
        // be passed (I/O safety); a `File` owns its descriptor and keeps
        // it open, the same one, until the `AsyncFd` drops it. The
        // replacement, `register_with_interest`, does not exist in the
        // tokio that the real daemon's lockfile pins.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(own, Interest::READABLE)?;
        Ok(Listener { fd })
    }
}

/// One stream's side of a [`Doorbell`].
#[derive(Debug)]
pub(crate) struct Listener {
    fd: AsyncFd<File>,
}

impl Listener {
    /// Waits until `ready()` holds or `bell` rings. May return spuriously.
    pub(crate) async fn wait(&self, bell: &Doorbell, ready: impl Fn() -> bool) {
        bell.armed.store(true, Ordering::Release);
        // Pairs with the fence in `ring_if_armed`.
        fence(Ordering::SeqCst);
        if ready() {
            // Left armed: at worst the next push rings once for nothing.
            return;
        }
        match self.fd.readable().await {
            // The count is never read: with the descriptors registered
            // edge-triggered, each write reports every registration once
            // (a count drained by one listener before the driver collects
            // the events would hide the ring from the others). Clearing
            // the readiness waits for the next write; one that came since
            // this readiness was seen is kept.
            Ok(mut guard) => guard.clear_ready(),
            // Only when the runtime is shutting down, which ends the
            // stream's task too.
            Err(_) => std::future::pending().await,
        }
    }
}

/// A non-blocking, close-on-exec eventfd with a count of 0.
fn eventfd() -> std::io::Result<File> {
    // SAFETY: eventfd takes no pointers; the flags are valid for it.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by eventfd and is owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Two listeners of `bell`.
    fn two_listeners(bell: &Doorbell) -> (Listener, Listener) {
        let open = || bell.listener().expect("an eventfd");
        (open(), open())
    }

    /// Awaits `f` for at most 10 s; `what` names it when it does not end.
    async fn within(f: impl Future<Output = ()>, what: &str) {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 10 s"));
    }

    /// Polls `f` once; whether it finished.
    pub(crate) async fn poll_once<F: Future + ?Sized>(mut f: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ring_from_another_thread_wakes_the_waiting_stream() {
        let bell = Arc::new(Doorbell::default());
        let newest = Arc::new(AtomicU64::new(0));
        let listener = bell.listener().expect("an eventfd");
        for n in 1..=200u64 {
            let (b, seen) = (bell.clone(), newest.clone());
            let producer = std::thread::spawn(move || {
                seen.store(n, Ordering::Release);
                b.ring_if_armed();
            });
            tokio::time::timeout(Duration::from_secs(10), async {
                while newest.load(Ordering::Acquire) < n {
                    listener
                        .wait(&bell, || newest.load(Ordering::Acquire) >= n)
                        .await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("push {n} never woke the stream"));
            producer.join().expect("the producer thread");
        }
    }

    #[tokio::test]
    async fn every_listener_hears_one_ring() {
        let bell = Doorbell::default();
        let (a, b) = two_listeners(&bell);
        let both = async {
            tokio::join!(a.wait(&bell, || false), b.wait(&bell, || false));
        };
        tokio::pin!(both);
        // Polled once: both are armed and waiting before the ring.
        assert!(
            !poll_once(both.as_mut()).await,
            "a listener returned before any ring"
        );
        bell.ring_if_armed();
        within(both, "one ring wakes both listeners").await;
    }

    #[tokio::test]
    async fn a_listener_that_wakes_late_hides_no_ring_from_another() {
        let bell = Doorbell::default();
        let (a, b) = two_listeners(&bell);
        // A waits; its wake-up comes but it is not run yet.
        let a_waits = a.wait(&bell, || false);
        tokio::pin!(a_waits);
        assert!(!poll_once(a_waits.as_mut()).await);
        let b_waits = b.wait(&bell, || false);
        tokio::pin!(b_waits);
        assert!(!poll_once(b_waits.as_mut()).await);
        bell.ring_if_armed();
        within(b_waits, "the ring wakes B").await;
        // B waits again, a second ring; then A runs its first wake-up.
        let b_again = b.wait(&bell, || false);
        tokio::pin!(b_again);
        assert!(!poll_once(b_again.as_mut()).await);
        bell.ring_if_armed();
        within(a_waits, "A was woken by the first ring").await;
        within(b_again, "the second ring still wakes B").await;
    }

    #[test]
    fn ringing_before_any_listener_is_a_no_op() {
        let bell = Doorbell::default();
        bell.ring();
        bell.ring_if_armed();
        assert!(bell.fd.get().is_none());
    }
}
