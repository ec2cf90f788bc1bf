//! A sidecar's stdout and stderr, line by line, into the daemon's `tracing`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Lines of the sidecar's output kept for error messages.
pub(crate) const TAIL_LINES: usize = 20;

/// Longest output line kept whole; the rest of a longer one is cut, so a
/// sidecar that prints without newlines cannot grow the daemon's memory.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024;

/// Reads the next line (without its newline) into `line`, at most
/// [`MAX_LINE_BYTES`] of it, noting how much was cut; bytes that are not
/// UTF-8 are replaced, not fatal. `Ok(false)` at the end of the output.
async fn next_line(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut String,
) -> std::io::Result<bool> {
    let mut bytes = Vec::new();
    let mut cut = 0usize;
    let mut seen_any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            break;
        }
        seen_any = true;
        let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(bytes.len());
        let kept = chunk.len().min(room);
        bytes.extend_from_slice(&chunk[..kept]);
        cut += chunk.len() - kept;
        let consumed = chunk.len() + usize::from(newline);
        reader.consume(consumed);
        if newline {
            break;
        }
    }
    if !seen_any {
        return Ok(false);
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    *line = String::from_utf8_lossy(&bytes).into_owned();
    if cut > 0 {
        line.push_str(&format!(" … ({cut} more bytes cut)"));
    }
    Ok(true)
}

/// Lines a [`Transcript`] keeps; older ones are dropped and counted.
const TRANSCRIPT_LINES: usize = 5_000;

/// Every line a plugin's processes printed, for the test kit to show when a
/// test fails: the newest [`TRANSCRIPT_LINES`], with a count of the older
/// lines dropped.
#[derive(Debug, Default)]
pub(crate) struct Transcript {
    lines: Mutex<(VecDeque<String>, u64)>,
}

impl Transcript {
    fn push(&self, stream: &str, line: &str) {
        let mut guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let (lines, dropped) = &mut *guard;
        if lines.len() == TRANSCRIPT_LINES {
            lines.pop_front();
            *dropped += 1;
        }
        lines.push_back(format!("[{stream}] {line}"));
    }

    /// The lines kept, oldest first, after a line counting those dropped.
    #[cfg_attr(not(any(test, feature = "testkit")), allow(dead_code))]
    pub(crate) fn lines(&self) -> Vec<String> {
        let guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let (lines, dropped) = &*guard;
        let mut out = Vec::with_capacity(lines.len() + 1);
        if *dropped > 0 {
            out.push(format!("({dropped} earlier lines dropped)"));
        }
        out.extend(lines.iter().cloned());
        out
    }
}

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
/// keeps the last few (and every line in `transcript`, when the test kit
/// asked for one). The caller runs it inside the plugin's span, which names
/// the plugin.
pub(crate) async fn forward(
    out: impl AsyncRead + Unpin,
    stream: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
    transcript: Option<Arc<Transcript>>,
) {
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    while let Ok(true) = next_line(&mut reader, &mut line).await {
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
        if let Some(transcript) = &transcript {
            transcript.push(stream, &line);
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(std::mem::take(&mut line));
    }
}

#[cfg(test)]
mod tests {
    use super::{json_line, level_of, next_line, MAX_LINE_BYTES};
    use tracing::Level;

    #[tokio::test]
    async fn long_and_broken_lines_are_cut_and_replaced_not_fatal() {
        let mut input = b"first\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 100));
        input.extend(b"\nbad \xff byte\nlast");
        let mut reader = tokio::io::BufReader::with_capacity(1000, &input[..]);
        let mut lines = Vec::new();
        let mut line = String::new();
        while next_line(&mut reader, &mut line).await.unwrap() {
            lines.push(line.clone());
        }
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], "first");
        assert!(lines[1].starts_with(&"x".repeat(MAX_LINE_BYTES)));
        assert!(
            lines[1].ends_with(" … (100 more bytes cut)"),
            "{}",
            &lines[1][MAX_LINE_BYTES..]
        );
        assert_eq!(lines[2], "bad \u{fffd} byte");
        assert_eq!(lines[3], "last");
    }

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
