//! Connections to a plugin socket and the slots they hold.
//!
//! A connection is *admitted* once one of its calls passed the uid and
//! token check. Until then it holds its slot only for
//! `admission_timeout`, and a new connection that finds every slot taken
//! evicts the oldest connection not admitted yet: a process without the
//! token cannot keep a sidecar (or grpcurl) out, however fast it connects.
//! Only admitted connections can fill the socket.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// What the auth check learns about the connection a call came on.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The peer's credentials.
    pub(crate) uds: tonic::transport::server::UdsConnectInfo,
    state: Arc<ConnState>,
}

impl ConnInfo {
    /// Marks the connection admitted: a call on it passed the checks.
    pub(crate) fn admit(&self) {
        self.state.admitted.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct ConnState {
    id: u64,
    accepted: Instant,
    admitted: AtomicBool,
    /// The socket while the connection is open; `None` once its `Conn` is
    /// dropped (the lock keeps the descriptor from being closed, and its
    /// number reused, while it is shut down).
    fd: Mutex<Option<RawFd>>,
    /// Cancelled when the connection closes, or is to be closed.
    close: CancellationToken,
}

impl ConnState {
    /// Closes the connection: shuts the socket down both ways, so the
    /// server's reads and writes on it fail and it drops the connection.
    /// The hot path pays nothing for this.
    fn close(&self) {
        self.close.cancel();
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: `fd` is open: the `Conn` that owns it clears it under
            // this lock before the descriptor is closed. shutdown has no
            // memory-safety preconditions.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// The open connections of one socket.
#[derive(Debug, Default)]
struct Slots {
    open: Mutex<Vec<Arc<ConnState>>>,
}

impl Slots {
    /// A slot for a new connection: a free one, or the one of the oldest
    /// connection not admitted yet, which is closed. `None` when every slot
    /// holds an admitted connection.
    fn take(self: &Arc<Self>, max: usize, state: &Arc<ConnState>) -> Option<Option<u64>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = None;
        if open.len() >= max {
            let oldest = open
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.admitted.load(Ordering::Relaxed))
                .min_by_key(|(_, c)| c.accepted)
                .map(|(i, _)| i)?;
            let gone = open.swap_remove(oldest);
            gone.close();
            evicted = Some(gone.id);
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
        self.state.close.cancel();
        self.slots.release(self.state.id);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
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

/// Accepts connections on `listener`, at most `max` open at once (see the
/// module's text for admission and eviction); a connection that finds
/// every slot admitted is closed at once, and logged.
pub(crate) fn incoming(
    listener: UnixListener,
    max: usize,
    admission_timeout: Duration,
    plugin: &'static str,
    stopping: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(Slots::default());
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    tokio::spawn(async move {
        let (mut refused, mut evictions): (u64, u64) = (0, 0);
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
            let state = Arc::new(ConnState {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                accepted: Instant::now(),
                admitted: AtomicBool::new(false),
                fd: Mutex::new(Some(stream.as_raw_fd())),
                close: CancellationToken::new(),
            });
            match slots.take(max, &state) {
                Some(evicted) => {
                    if evicted.is_some() {
                        evictions += 1;
                        if evictions.is_power_of_two() {
                            tracing::warn!(
                                plugin,
                                max,
                                evictions,
                                "plugin socket full: closing the oldest connections that never made an authenticated call"
                            );
                        }
                    }
                }
                None => {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            plugin,
                            max,
                            refused,
                            "too many authenticated connections to the plugin socket: closing new ones"
                        );
                    }
                    continue;
                }
            }
            // Not admitted in time: closed, its slot free.
            let watched = state.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(admission_timeout) => {
                        if !watched.admitted.load(Ordering::Relaxed) {
                            watched.close();
                        }
                    }
                    () = watched.close.cancelled() => {}
                }
            });
            let conn = Conn {
                stream,
                state,
                slots: slots.clone(),
            };
            if tx.send(Ok(conn)).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, admitted: bool) -> Arc<ConnState> {
        Arc::new(ConnState {
            id,
            accepted: Instant::now(),
            admitted: AtomicBool::new(admitted),
            fd: Mutex::new(None),
            close: CancellationToken::new(),
        })
    }

    #[test]
    fn a_full_socket_evicts_the_oldest_connection_not_admitted() {
        let slots = Arc::new(Slots::default());
        let (a, b, c) = (conn(1, true), conn(2, false), conn(3, false));
        for s in [&a, &b, &c] {
            assert_eq!(slots.take(3, s), Some(None));
        }
        let d = conn(4, false);
        assert_eq!(
            slots.take(3, &d),
            Some(Some(2)),
            "b is the oldest not admitted"
        );
        assert!(b.close.is_cancelled() && !a.close.is_cancelled());
        c.admitted.store(true, Ordering::Relaxed);
        d.admitted.store(true, Ordering::Relaxed);
        assert_eq!(
            slots.take(3, &conn(5, false)),
            None,
            "all admitted: refused"
        );
        slots.release(1);
        assert_eq!(slots.take(3, &conn(6, false)), Some(None));
    }
}
