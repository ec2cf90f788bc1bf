//! The echo pattern's floor: the hops of `e2e` over plain blocking threads
//! and Unix sockets, with no gRPC, no runtime and no queue. A producer
//! thread rings a server thread (a socket pair standing in for the
//! daemon's doorbell); the server writes the ping to a client process,
//! which asks the server one question (the lookup), waits for the answer,
//! and sends the pong back; the server records the time from the ring.
//! Five thread wake-ups per ping across two processes, as in ours. What
//! this pattern takes at 1,000/s against back to back is what the machine
//! itself charges for the wake-ups of a light load.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::stats::{median_p99, mono_ns};

/// Message size, as the bench's pings.
const SIZE: usize = 64;
/// Byte 8 of a message: what it is.
const PING: u8 = 0;
const LOOKUP: u8 = 1;
const PONG: u8 = 2;

/// The client process (`pim-bench raw-echo-client <socket>`): answers each
/// ping with a lookup, then, once answered, a pong, one ping at a time
/// (pings that come while a lookup waits for its answer wait in turn),
/// until the server closes.
pub(crate) fn client(path: &str) -> anyhow::Result<()> {
    let mut socket = UnixStream::connect(path)?;
    let mut buf = [0u8; SIZE];
    let mut waiting = std::collections::VecDeque::new();
    let mut asked = false;
    loop {
        if socket.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        match buf[8] {
            PING => waiting.push_back(buf),
            // The answer to the lookup, which carries its ping's time.
            _ => {
                asked = false;
                buf[8] = PONG;
                socket.write_all(&buf)?;
            }
        }
        if !asked {
            if let Some(mut next) = waiting.pop_front() {
                next[8] = LOOKUP;
                socket.write_all(&next)?;
                asked = true;
            }
        }
    }
}

/// Waits until `a` or `b` is readable: which of them.
fn readable(a: &UnixStream, b: &UnixStream) -> std::io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of
        // the call, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The server thread: a ring (8 bytes: the ping's time) becomes a ping to
/// the client; a lookup is answered; a pong's latency goes to `done`.
/// Returns when the bell's other end closes.
fn serve(
    mut bell: UnixStream,
    mut conn: UnixStream,
    done: &mpsc::Sender<u64>,
) -> std::io::Result<()> {
    let mut buf = [0u8; SIZE];
    loop {
        let (rung, asked) = readable(&bell, &conn)?;
        if rung {
            let mut at = [0u8; 8];
            if bell.read_exact(&mut at).is_err() {
                return Ok(());
            }
            buf = [0u8; SIZE];
            buf[..8].copy_from_slice(&at);
            buf[8] = PING;
            conn.write_all(&buf)?;
        }
        if asked {
            conn.read_exact(&mut buf)?;
            match buf[8] {
                LOOKUP => conn.write_all(&buf)?,
                _ => {
                    let sent = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                    let _ = done.send(mono_ns().saturating_sub(sent));
                }
            }
        }
    }
}

/// The pattern back to back (`n` pings), then `n_paced` pings at 1,000/s:
/// ((median, p99) back to back, (median, p99) at 1,000/s), ns.
pub(crate) async fn measure(
    dir: &Path,
    n: usize,
    n_paced: usize,
) -> anyhow::Result<((u64, u64), (u64, u64))> {
    let path = dir.join("raw-echo.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("raw-echo-client")
        .arg(&path)
        .kill_on_drop(true)
        .spawn()?;
    let (conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| anyhow::anyhow!("the raw echo client did not connect within 10 s"))??;
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    let (mut ring, bell) = UnixStream::pair()?;
    let (done_tx, done) = mpsc::channel();
    let server = std::thread::spawn(move || serve(bell, conn, &done_tx));
    let measured = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let next = |done: &mpsc::Receiver<u64>| {
            done.recv_timeout(Duration::from_secs(10))
                .map_err(|_| anyhow::anyhow!("no raw pong within 10 s"))
        };
        let mut ping = || ring.write_all(&mono_ns().to_le_bytes());
        for _ in 0..n.min(500) {
            ping()?;
            next(&done)?;
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            ping()?;
            samples.push(next(&done)?);
        }
        let back_to_back = median_p99(&mut samples);
        let mut failed = None;
        crate::e2e::at_1000_per_s(n_paced, || {
            if let Err(e) = ping() {
                failed.get_or_insert(e);
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        let mut samples = (0..n_paced)
            .map(|_| next(&done))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((back_to_back, median_p99(&mut samples)))
        // `ring` drops here: the server thread returns, closing the
        // connection, and the client exits.
    })
    .await??;
    tokio::task::spawn_blocking(move || server.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the raw echo server panicked"))??;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = std::fs::remove_file(&path);
    Ok(measured)
}
