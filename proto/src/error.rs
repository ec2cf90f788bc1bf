use std::fmt;

/// A wire value that breaks a limit of the protocol.
///
/// It names the field by its path in the request (for example
/// `frame.plugin_payload.kind`) and says what the limit is and what was
/// received; it never quotes a field's bytes, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    field: String,
    problem: String,
}

impl InvalidField {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The path of the offending field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }

    /// The same error for a field nested in `parent`.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid field `{}`: {}", self.field, self.problem)
    }
}

impl std::error::Error for InvalidField {}

impl From<InvalidField> for tonic::Status {
    fn from(err: InvalidField) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}
