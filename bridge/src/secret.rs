//! Random secrets: plugin tokens and session ids.

/// `bytes` random bytes from the kernel, hex encoded.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                // Without flags, getrandom(2) blocks until the pool is ready
                // and reads from no file (so no descriptor limit applies);
                // besides EINTR it fails only for a bad buffer (this one is
                // valid) or on a kernel older than 3.17 (the sandbox needs 5.x).
                assert!(
                    err.kind() == std::io::ErrorKind::Interrupted,
                    "getrandom(2) failed: {err}"
                );
            }
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh plugin token: 256 random bits.
pub(crate) fn new_token() -> String {
    random_hex(32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_hex_is_fresh_and_sized() {
        let (a, b) = (super::random_hex(32), super::random_hex(32));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
