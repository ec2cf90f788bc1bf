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
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Without flags, getrandom(2) blocks until the pool is ready
                // and needs no descriptor; it fails only where a filter of
                // the daemon's own (seccomp, a container's) refuses it. Then
                // the device, which such filters allow.
                from_device(&mut buf[filled..]);
                break;
            }
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `buf` from `/dev/urandom`.
fn from_device(buf: &mut [u8]) {
    use std::io::Read;
    // A host whose kernel refuses both sources cannot make a secret that
    // keeps other local processes out: there is no safe way to go on.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .unwrap_or_else(|e| {
            panic!("no random source: getrandom(2) is refused and /dev/urandom fails: {e}")
        });
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
