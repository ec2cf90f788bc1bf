//! A hostile neighbour for the lock-out test: from `threads` threads it
//! connects to a plugin socket as fast as it can (or every `interval_ms`),
//! holds every connection the host leaves open, never sending a byte, and
//! re-takes each slot the host frees.
//!
//! ```text
//! socket-filler <socket path> [threads, default 1] [interval_ms, default 2]
//! ```
//!
//! Prints `held <n> closed-by-host <m>` every 250 ms; runs until killed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: socket-filler <socket path> [threads] [interval_ms]");
        std::process::exit(2);
    };
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let interval = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(2));
    let held = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    for _ in 0..threads {
        let (path, held, closed) = (path.clone(), held.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut mine: Vec<UnixStream> = Vec::new();
            let mut byte = [0u8; 64];
            loop {
                if let Ok(stream) = UnixStream::connect(&path) {
                    if stream.set_nonblocking(true).is_ok() {
                        mine.push(stream);
                        held.fetch_add(1, Ordering::Relaxed);
                    }
                }
                mine.retain_mut(|s| match s.read(&mut byte) {
                    Ok(n) if n > 0 => true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                    _ => {
                        held.fetch_sub(1, Ordering::Relaxed);
                        closed.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                });
                if !interval.is_zero() {
                    std::thread::sleep(interval);
                }
            }
        });
    }
    loop {
        std::thread::sleep(Duration::from_millis(250));
        println!(
            "held {} closed-by-host {}",
            held.load(Ordering::Relaxed),
            closed.load(Ordering::Relaxed)
        );
    }
}
