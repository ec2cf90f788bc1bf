//! A sidecar's stdout and stderr, line by line, into the daemon's `tracing`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Lines of the sidecar's output kept for error messages.
pub(crate) const TAIL_LINES: usize = 20;

/// Level and message of a JSON log line (`{"level": "WARN", "message": …}`,
/// or tracing-subscriber's `{"level": …, "fields": {"message": …}}`).
fn json_line(line: &str) -> Option<(tracing::Level, String)> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let level = obj
        .get("level")
        .or_else(|| obj.get("severity"))
        .and_then(|l| l.as_str())
        .and_then(|l| l.to_ascii_uppercase().parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let message = obj
        .get("message")
        .or_else(|| obj.get("msg"))
        .or_else(|| obj.get("fields").and_then(|f| f.get("message")))
        .and_then(|m| m.as_str())
        .map_or_else(|| line.trim().to_owned(), str::to_owned);
    Some((level, message))
}

/// Splits a leading level word (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`,
/// as the Rust SDK and most loggers print) off a line.
fn level_of(line: &str) -> (tracing::Level, &str) {
    let trimmed = line.trim_start();
    for (word, level) in [
        ("ERROR", tracing::Level::ERROR),
        ("WARN", tracing::Level::WARN),
        ("INFO", tracing::Level::INFO),
        ("DEBUG", tracing::Level::DEBUG),
        ("TRACE", tracing::Level::TRACE),
    ] {
        if let Some(rest) = trimmed.strip_prefix(word) {
            if rest.is_empty() || rest.starts_with([' ', ':']) {
                return (level, rest.trim_start_matches([' ', ':']));
            }
        }
    }
    (tracing::Level::INFO, line)
}

/// Forwards each output line into `tracing`, at the line's own level, and
/// keeps the last few. The caller runs it inside the plugin's span, which
/// names the plugin.
pub(crate) async fn forward(
    out: impl AsyncRead + Unpin,
    stream: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parsed = if line.trim_start().starts_with('{') {
            json_line(&line)
        } else {
            None
        };
        let (level, msg) = match &parsed {
            Some((level, msg)) => (*level, msg.as_str()),
            None => level_of(&line),
        };
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "pim_sidecar::output", $lvl, stream, "{msg}")
            };
        }
        match level {
            tracing::Level::ERROR => emit!(tracing::Level::ERROR),
            tracing::Level::WARN => emit!(tracing::Level::WARN),
            tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
            tracing::Level::TRACE => emit!(tracing::Level::TRACE),
            _ => emit!(tracing::Level::INFO),
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::{json_line, level_of};
    use tracing::Level;

    #[test]
    fn output_lines_keep_their_level() {
        assert_eq!(level_of(" WARN slow peer"), (Level::WARN, "slow peer"));
        assert_eq!(level_of("ERROR: boom"), (Level::ERROR, "boom"));
        assert_eq!(level_of("DEBUG"), (Level::DEBUG, ""));
        assert_eq!(level_of("INFORMATION"), (Level::INFO, "INFORMATION"));
        assert_eq!(level_of("plain line"), (Level::INFO, "plain line"));
    }

    #[test]
    fn json_lines_keep_their_level() {
        assert_eq!(
            json_line(r#"{"level":"warn","message":"disk low"}"#),
            Some((Level::WARN, "disk low".into()))
        );
        assert_eq!(
            json_line(
                r#"{"timestamp":"t","level":"ERROR","fields":{"message":"boom"},"target":"x"}"#
            ),
            Some((Level::ERROR, "boom".into()))
        );
        assert_eq!(
            json_line(r#"{"msg":"hi"}"#),
            Some((Level::INFO, "hi".into()))
        );
        assert_eq!(json_line("{not json"), None);
    }
}
