use pim_plugin_proto::InvalidField;

/// A host call that failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum HostError {
    /// The host answered with an error status.
    Rpc(tonic::Status),
    /// The host's answer broke a protocol limit.
    InvalidResponse(InvalidField),
    /// The socket could not be reached.
    Connect(tonic::transport::Error),
    /// The token cannot be presented: empty, or not printable ASCII.
    InvalidToken(String),
}

impl HostError {
    /// The gRPC status code, for `Rpc` errors.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc(s) => Some(s.code()),
            _ => None,
        }
    }
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rpc(s) => write!(f, "host answered {:?}: {}", s.code(), s.message()),
            Self::InvalidResponse(e) => write!(f, "invalid answer from the host: {e}"),
            Self::Connect(e) => write!(f, "cannot reach the host: {e}"),
            Self::InvalidToken(why) => write!(f, "invalid token: {why}"),
        }
    }
}

impl std::error::Error for HostError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Rpc(s) => Some(s),
            Self::InvalidResponse(e) => Some(e),
            Self::Connect(e) => Some(e),
            Self::InvalidToken(_) => None,
        }
    }
}

impl From<tonic::Status> for HostError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc(s)
    }
}

impl From<InvalidField> for HostError {
    fn from(e: InvalidField) -> Self {
        Self::InvalidResponse(e)
    }
}
