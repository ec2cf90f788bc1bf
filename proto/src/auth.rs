//! The `authorization: Bearer <token>` metadata that every call carries.

/// Metadata key of the token.
pub const METADATA_KEY: &str = "authorization";
/// Scheme before the token in the metadata value.
pub const SCHEME: &str = "Bearer ";

/// The metadata value for `token`.
pub fn bearer(token: &str) -> String {
    format!("{SCHEME}{token}")
}

/// The token in a metadata value, if it has the `Bearer ` scheme.
pub fn token_of(value: &[u8]) -> Option<&[u8]> {
    value.strip_prefix(SCHEME.as_bytes())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_round_trips() {
        assert_eq!(token_of(bearer("abc").as_bytes()), Some(&b"abc"[..]));
        assert_eq!(token_of(b"Basic abc"), None);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
    }
}
