//! A hostile neighbour for the lock-out test: it connects to a plugin
//! socket every 2 ms and holds every connection the host leaves open,
//! never sending a byte, and re-takes each slot the host frees.
//!
//! ```text
//! socket-filler <socket path>
//! ```
//!
//! Prints `held <n> closed-by-host <m>` every 250 ms; runs until killed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: socket-filler <socket path>");
        std::process::exit(2);
    };
    let mut held: Vec<UnixStream> = Vec::new();
    let mut closed_by_host: u64 = 0;
    let mut reported = Instant::now();
    let mut byte = [0u8; 64];
    loop {
        if let Ok(stream) = UnixStream::connect(&path) {
            if stream.set_nonblocking(true).is_ok() {
                held.push(stream);
            }
        }
        held.retain_mut(|s| match s.read(&mut byte) {
            Ok(0) => {
                closed_by_host += 1;
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(_) => {
                closed_by_host += 1;
                false
            }
        });
        if reported.elapsed() >= Duration::from_millis(250) {
            println!("held {} closed-by-host {closed_by_host}", held.len());
            reported = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
