//! A stateful sidecar whose effect happens once per event, across crashes:
//! it counts `counter.hit` payloads in a file of its data directory.
//!
//! Delivery is at least once: events handled but not yet acked when the
//! process dies come again. So each hit writes the new count together with
//! the event's `seq` and `host_instance` ([`pim_sidecar::EventInfo`]) in
//! one atomic step (a new file renamed over the old one), and
//! [`Sidecar::applied`] tells the SDK how far the file got: after a
//! restart it skips those events instead of counting them twice. (The
//! rename survives the process being killed; for power loss, also `fsync`
//! the file and the directory.)
//!
//! `counter.get` answers the sender with a `counter.count` payload whose
//! body is the count. The daemon spawns it like any sidecar
//! (`tests/once.rs` runs it and SIGKILLs it in the middle of 10,000 hits).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use pim_sidecar::{async_trait, Applied, Bytes, Context, ControlFrame, EventInfo, NodeId, Sidecar};
use tokio::sync::OnceCell;

/// The count and the event it includes.
#[derive(Debug, Default, Clone)]
struct State {
    host_instance: String,
    seq: u64,
    count: u64,
}

#[derive(Default)]
struct Counter {
    file: OnceCell<PathBuf>,
    state: Mutex<State>,
    host: OnceCell<pim_sidecar::HostClient>,
}

impl Counter {
    fn file(&self) -> anyhow::Result<&PathBuf> {
        self.file
            .get()
            .ok_or_else(|| anyhow::anyhow!("not started"))
    }

    /// Reads `<data dir>/count`: `<host instance> <seq> <count>`.
    fn load(path: &std::path::Path) -> anyhow::Result<State> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(e.into()),
        };
        let mut words = text.split_whitespace();
        let mut next = || {
            words
                .next()
                .ok_or_else(|| anyhow::anyhow!("{} is truncated", path.display()))
        };
        Ok(State {
            host_instance: next()?.to_owned(),
            seq: next()?.parse()?,
            count: next()?.parse()?,
        })
    }

    /// Writes the state in one step: a new file renamed over the old.
    fn store(path: &std::path::Path, state: &State) -> anyhow::Result<()> {
        let tmp = path.with_extension("new");
        std::fs::write(
            &tmp,
            format!("{} {} {}\n", state.host_instance, state.seq, state.count),
        )?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

#[async_trait]
impl Sidecar for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn payload_kinds(&self) -> &[&str] {
        &["counter.hit", "counter.get"]
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let path = ctx.data_dir.join("count");
        let state = Self::load(&path)?;
        tracing::info!(count = state.count, seq = state.seq, "counter loaded");
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        let _ = self.file.set(path);
        let _ = self.host.set(ctx.host);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, _body: Bytes) -> anyhow::Result<()> {
        if kind == "counter.get" {
            let count = self.state.lock().unwrap_or_else(|e| e.into_inner()).count;
            let reply = ControlFrame::PluginPayload {
                kind: "counter.count".into(),
                body: Bytes::from(count.to_string()),
            };
            if let Some(host) = self.host.get() {
                host.send_direct(src, reply).await?;
            }
            return Ok(());
        }
        let event = EventInfo::current().ok_or_else(|| anyhow::anyhow!("no event in hand"))?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = State {
            host_instance: event.host_instance.to_string(),
            seq: event.seq,
            count: state.count + 1,
        };
        // The effect and its position, together: if this fails, nothing
        // changed, and the event is offered again.
        Self::store(self.file()?, &next).map_err(|e| pim_sidecar::Retry::new(format!("{e:#}")))?;
        *state = next;
        Ok(())
    }

    async fn applied(&self) -> Option<Applied> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (!state.host_instance.is_empty())
            .then(|| Applied::new(state.host_instance.clone(), state.seq))
    }
}

fn main() -> ExitCode {
    pim_sidecar::run(Counter::default())
}
