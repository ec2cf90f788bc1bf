//! Connections to a plugin socket and the slots they hold.
//!
//! A connection is *admitted* once one of its calls passed the uid and
//! token check. Until then it holds its slot only for `admission_timeout`.
//! A new connection that finds every slot taken closes a connection not
//! admitted yet: the oldest of the process that holds the most of them,
//! never one of the supervised sidecar's own process. So a process without
//! the token cannot keep a sidecar (or grpcurl) out, however fast it
//! connects; only admitted connections can fill the socket.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// A connection's admission: waiting for its first authenticated call,
/// admitted, or being closed. Admission and closing race through one
/// compare-and-swap, so an authenticated call is never cut off.
const PENDING: u8 = 0;
const ADMITTED: u8 = 1;
const CLOSING: u8 = 2;

/// What the auth check learns about the connection a call came on.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The peer's credentials.
    pub(crate) uds: tonic::transport::server::UdsConnectInfo,
    state: Arc<ConnState>,
}

impl ConnInfo {
    /// Admits the connection: a call on it passed the checks. `false` when
    /// it is already being closed (evicted or too late).
    pub(crate) fn admit(&self) -> bool {
        // Every call passes here: the common case is one load.
        if self.state.admission.load(Ordering::Acquire) == ADMITTED {
            return true;
        }
        match self.state.admission.compare_exchange(
            PENDING,
            ADMITTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(now) => now == ADMITTED,
        }
    }
}

#[derive(Debug)]
struct ConnState {
    id: u64,
    accepted: Instant,
    /// The peer's process, as `SO_PEERCRED` gave it at accept.
    pid: Option<u32>,
    admission: AtomicU8,
    /// The socket while the connection is open; `None` once its `Conn` is
    /// dropped (the lock keeps the descriptor from being closed, and its
    /// number reused, while it is shut down).
    fd: Mutex<Option<RawFd>>,
    /// Cancelled when the connection closes.
    closed: CancellationToken,
}

impl ConnState {
    fn pending(&self) -> bool {
        self.admission.load(Ordering::Acquire) == PENDING
    }

    /// Closes the connection if it is not admitted: shuts the socket down
    /// both ways, so the server's reads and writes on it fail and it drops
    /// the connection (the hot path pays nothing for this). `false` when it
    /// was admitted first.
    fn close_if_pending(&self) -> bool {
        if self
            .admission
            .compare_exchange(PENDING, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: `fd` is open: the `Conn` that owns it clears it under
            // this lock before the descriptor is closed. shutdown has no
            // memory-safety preconditions.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        true
    }
}

/// Limits on one socket's connections.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub(crate) max: usize,
    pub(crate) timeout: Duration,
    /// The spawned sidecar's process (0: none), whose connections are
    /// never evicted.
    pub(crate) sidecar_pid: Arc<AtomicU32>,
}

/// The open connections of one socket.
#[derive(Debug, Default)]
struct Slots {
    open: Mutex<Vec<Arc<ConnState>>>,
}

impl Slots {
    /// A slot for a new connection: a free one, or the one of a connection
    /// not admitted yet, which is closed (the oldest of the process with
    /// the most, never one of `protected`). `None` when no slot can be had.
    fn take(&self, max: usize, protected: u32, state: &Arc<ConnState>) -> Option<Option<u64>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = None;
        while open.len() >= max {
            let mut per_pid: HashMap<Option<u32>, usize> = HashMap::new();
            for c in open
                .iter()
                .filter(|c| c.pending() && c.pid != Some(protected))
            {
                *per_pid.entry(c.pid).or_default() += 1;
            }
            let victim = open
                .iter()
                .enumerate()
                .filter(|(_, c)| c.pending() && c.pid != Some(protected))
                .max_by_key(|(_, c)| (per_pid[&c.pid], std::cmp::Reverse(c.accepted)))
                .map(|(i, _)| i)?;
            if open[victim].close_if_pending() {
                evicted = Some(open.swap_remove(victim).id);
            }
            // Otherwise it was admitted just now: look again.
        }
        open.push(state.clone());
        Some(evicted)
    }

    fn release(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| c.id != id);
    }
}

/// An accepted connection: holds its slot until it closes, and closes when
/// it is evicted or not admitted in time.
pub(crate) struct Conn {
    stream: tokio::net::UnixStream,
    state: Arc<ConnState>,
    slots: Arc<Slots>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.state.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        *self.state.fd.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.state.closed.cancel();
        self.slots.release(self.state.id);
    }
}

impl Conn {
    /// What the auth check learns about this connection.
    pub(crate) fn info(&self) -> ConnInfo {
        use tonic::transport::server::Connected;
        ConnInfo {
            uds: self.stream.connect_info(),
            state: self.state.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Counts an event and logs it at 1, 2, 4, 8, … occurrences.
fn count_and_log(counter: &mut u64, log: impl FnOnce(u64)) {
    *counter += 1;
    if counter.is_power_of_two() {
        log(*counter);
    }
}

/// Accepts connections on `listener` under `limits` (see the module's text).
pub(crate) fn incoming(
    listener: UnixListener,
    limits: Admission,
    plugin: &'static str,
    stopping: CancellationToken,
) -> tokio::sync::mpsc::Receiver<Conn> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(Slots::default());
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    tokio::spawn(async move {
        let (mut refused, mut evictions) = (0u64, 0u64);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stopping.cancelled() => break,
                () = tx.closed() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(plugin, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let cred = stream.peer_cred().ok();
            let state = Arc::new(ConnState {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                accepted: Instant::now(),
                pid: cred
                    .and_then(|c| c.pid())
                    .and_then(|p| u32::try_from(p).ok()),
                admission: AtomicU8::new(PENDING),
                fd: Mutex::new(Some(stream.as_raw_fd())),
                closed: CancellationToken::new(),
            });
            let protected = limits.sidecar_pid.load(Ordering::Relaxed);
            match slots.take(limits.max, protected, &state) {
                Some(Some(_)) => count_and_log(&mut evictions, |n| {
                    tracing::warn!(
                        plugin,
                        max = limits.max,
                        evictions = n,
                        "plugin socket full: closing connections that never made an authenticated call"
                    )
                }),
                Some(None) => {}
                None => {
                    count_and_log(&mut refused, |n| {
                        tracing::warn!(
                            plugin,
                            max = limits.max,
                            refused = n,
                            "too many authenticated connections to the plugin socket: closing new ones"
                        )
                    });
                    continue;
                }
            }
            // Not admitted in time: closed, its slot free.
            let watched = state.clone();
            let timeout = limits.timeout;
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(timeout) => {
                        watched.close_if_pending();
                    }
                    () = watched.closed.cancelled() => {}
                }
            });
            let conn = Conn {
                stream,
                state,
                slots: slots.clone(),
            };
            if tx.send(conn).await.is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, pid: u32, admission: u8) -> Arc<ConnState> {
        Arc::new(ConnState {
            id,
            accepted: Instant::now(),
            pid: Some(pid),
            admission: AtomicU8::new(admission),
            fd: Mutex::new(None),
            closed: CancellationToken::new(),
        })
    }

    #[test]
    fn a_full_socket_evicts_from_the_process_holding_the_most_pending_connections() {
        let slots = Slots::default();
        let sidecar = conn(1, 10, PENDING);
        let (f1, f2) = (conn(2, 66, PENDING), conn(3, 66, PENDING));
        let grpcurl = conn(4, 20, PENDING);
        for c in [&sidecar, &f1, &f2, &grpcurl] {
            assert_eq!(slots.take(4, 10, c), Some(None));
        }
        // The filler (pid 66) holds the most: its oldest goes, although the
        // sidecar's and grpcurl's connections are older.
        assert_eq!(slots.take(4, 10, &conn(5, 66, PENDING)), Some(Some(2)));
        assert_eq!(f1.admission.load(Ordering::Relaxed), CLOSING);
        // An admitted connection is never closed, nor is a pending one of
        // the protected sidecar.
        grpcurl.admission.store(ADMITTED, Ordering::Relaxed);
        assert_eq!(slots.take(4, 10, &conn(6, 66, PENDING)), Some(Some(3)));
        assert_eq!(slots.take(4, 10, &conn(7, 66, PENDING)), Some(Some(5)));
        assert_eq!(sidecar.admission.load(Ordering::Relaxed), PENDING);
        // A connection closing can no longer be admitted.
        let info_state = conn(8, 1, CLOSING);
        assert!(info_state
            .admission
            .compare_exchange(PENDING, ADMITTED, Ordering::AcqRel, Ordering::Acquire)
            .is_err());
        // Everything admitted or protected: the new one is refused.
        for c in slots.open.lock().unwrap().iter() {
            if c.pid != Some(10) {
                c.admission.store(ADMITTED, Ordering::Relaxed);
            }
        }
        assert_eq!(slots.take(4, 10, &conn(9, 66, PENDING)), None);
        slots.release(1);
        assert_eq!(slots.take(4, 10, &conn(10, 66, PENDING)), Some(None));
    }
}
