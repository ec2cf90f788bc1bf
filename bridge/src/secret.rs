//! Random secrets: plugin tokens and session ids.

use std::io::Read;

/// `bytes` random bytes from the kernel, hex encoded.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The kernel's random source is always readable on Linux; failing to read it
    // means the system is broken beyond what a plugin host can work around.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh plugin token: 256 random bits.
pub(crate) fn new_token() -> String {
    random_hex(32)
}
