//! The benchmark's sidecar process (`pim-bench sidecar`), written with the
//! SDK and its defaults (single-threaded runtime). It counts `bench.data`
//! payloads, records their latency from the timestamp in the first 8 bytes
//! of the body, and runs the round-trip loops on command; results go back
//! to the host as `bench.result` payloads through SendDirect.

use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use pim_core::NodeId;
use pim_protocol::ControlFrame;
use pim_sidecar::proto::pb;
use pim_sidecar::proto::pb::peer_directory_client::PeerDirectoryClient;
use pim_sidecar::{async_trait, Context, HostClient, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::stats::{encode, mono_ns};

#[derive(Default)]
struct Bench {
    /// `PIM_PLUGIN_NAME` (`bench` by default): many bench sidecars may share
    /// a daemon, each with its own name and kinds `<name>.data`, `<name>.cmd`.
    name: &'static str,
    /// `<name>.data`, `<name>.cmd`, `<name>.ping`.
    kinds: [&'static str; 3],
    /// `<name>.pong`.
    pong: &'static str,
    host: OnceCell<HostClient>,
    latencies: Mutex<Option<Vec<u64>>>,
    /// `BENCH_STALL` set: never return from a data handler (read once).
    stall: bool,
    /// `BENCH_LOG_EACH` set: log a line per payload at INFO, as the echo
    /// example once did at the SDK's default level.
    log_each: bool,
}

fn result(name: &str, body: String) -> ControlFrame {
    ControlFrame::PluginPayload {
        kind: format!("{name}.result"),
        body: body.into(),
    }
}

impl Bench {
    fn host(&self) -> &HostClient {
        self.host.get().expect("start runs before any payload")
    }

    /// The five round trips, measured in interleaved rounds so that a slow
    /// moment of the machine weighs on all of them alike.
    async fn round_trips(
        &self,
        floor_sock: &Path,
        uds_echo: &Path,
        n: usize,
    ) -> anyhow::Result<String> {
        const ROUNDS: usize = 10;
        let host = self.host();
        let node = NodeId::from_bytes([9; 16]);
        let frame = ControlFrame::PluginPayload {
            kind: format!("{}.rtt", self.name),
            body: Bytes::from_static(&[0; 64]),
        };
        // Raw tonic unary on the same kind of channel, to a server with a
        // trivial handler: no auth, no session, no conversion.
        let mut raw = PeerDirectoryClient::new(pim_sidecar::connect_channel(floor_sock).await?);
        let raw_req = pb::LookupX25519Request {
            session_id: String::new(),
            node: Bytes::from_static(&[9; 16]),
        };
        // Raw Unix-socket ping-pong, 64 bytes each way.
        let mut stream = tokio::net::UnixStream::connect(uds_echo).await?;
        let mut buf = [0u8; 64];
        let mut samples: [Vec<u64>; 5] = Default::default();
        let per_round = n.div_ceil(ROUNDS);
        for _ in 0..ROUNDS {
            for _ in 0..per_round {
                let t = mono_ns();
                host.lookup_x25519(&node).await?;
                samples[0].push(mono_ns() - t);
            }
            for _ in 0..per_round {
                let t = mono_ns();
                host.send_routed(node, frame.clone()).await?;
                samples[1].push(mono_ns() - t);
            }
            for _ in 0..per_round {
                let t = mono_ns();
                raw.lookup_x25519(raw_req.clone()).await?;
                samples[2].push(mono_ns() - t);
            }
            // The same raw call, busy-polled as the SDK's port calls are.
            for _ in 0..per_round {
                let t = mono_ns();
                pim_sidecar::busy_poll(raw.lookup_x25519(raw_req.clone()), host.busy_poll())
                    .await?;
                samples[4].push(mono_ns() - t);
            }
            for _ in 0..per_round {
                let t = mono_ns();
                stream.write_all(&buf).await?;
                stream.read_exact(&mut buf).await?;
                samples[3].push(mono_ns() - t);
            }
        }
        let out: Vec<String> = samples.iter_mut().map(|s| encode(s)).collect();
        Ok(format!("rtt {}", out.join(" ")))
    }
}

#[async_trait]
impl Sidecar for Bench {
    fn name(&self) -> &str {
        self.name
    }

    fn payload_kinds(&self) -> &[&str] {
        &self.kinds
    }

    async fn start(&self, ctx: Context) -> anyhow::Result<()> {
        let _ = self.host.set(ctx.host);
        Ok(())
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        if kind == self.kinds[2] {
            // The echo pattern: one lookup, then the pong routed back,
            // with the CPU the handler ran on in bytes 8..12.
            self.host().lookup_x25519(&src).await?;
            let mut body = bytes::BytesMut::from(body);
            if let Some(cpu) = body.get_mut(8..12) {
                cpu.copy_from_slice(&crate::stats::current_cpu().to_le_bytes());
            }
            let pong = ControlFrame::PluginPayload {
                kind: self.pong.to_owned(),
                body: body.freeze(),
            };
            self.host().send_routed(src, pong).await?;
            return Ok(());
        }
        if kind == self.kinds[0] {
            if self.stall {
                std::future::pending::<()>().await;
            }
            if self.log_each {
                tracing::info!(bytes = body.len(), "payload from {src}");
            }
            if let Some(samples) = self
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                if let Some(sent) = body.get(..8) {
                    let sent = u64::from_le_bytes(sent.try_into().expect("8 bytes"));
                    samples.push(mono_ns().saturating_sub(sent));
                }
            }
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let mut words = text.split(' ');
        let reply = match words.next() {
            Some("lat-start") => {
                *self.latencies.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
                "lat-started".to_owned()
            }
            Some("lat-report") => {
                let samples = self
                    .latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let mut samples = samples.unwrap_or_default();
                let count = samples.len();
                format!("lat {} {count}", encode(warm(&mut samples)))
            }
            Some("rtt") => {
                let floor = words.next().unwrap_or_default();
                let echo = words.next().unwrap_or_default();
                let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
                // Boxed: its state is kilobytes, and inlined it would make
                // every call of this handler allocate and copy that much.
                Box::pin(self.round_trips(Path::new(floor), Path::new(echo), n)).await?
            }
            other => format!("unknown command {other:?}"),
        };
        self.host()
            .send_direct(src, result(self.name, reply))
            .await?;
        Ok(())
    }
}

/// Latency samples without the first ones (100, at most a tenth): a
/// fresh process's first events meet cold code and caches. Ours and the
/// floor's alike.
fn warm(samples: &mut [u64]) -> &mut [u64] {
    let skip = 100.min(samples.len() / 10);
    &mut samples[skip..]
}

/// `pim-bench sidecar`: run as the benchmark's sidecar.
pub(crate) fn main() -> std::process::ExitCode {
    let name: &'static str = Box::leak(
        std::env::var("PIM_PLUGIN_NAME")
            .unwrap_or_else(|_| "bench".into())
            .into_boxed_str(),
    );
    let data: &'static str = Box::leak(format!("{name}.data").into_boxed_str());
    let cmd: &'static str = Box::leak(format!("{name}.cmd").into_boxed_str());
    let ping: &'static str = Box::leak(format!("{name}.ping").into_boxed_str());
    let pong: &'static str = Box::leak(format!("{name}.pong").into_boxed_str());
    pim_sidecar::run(Bench {
        name,
        kinds: [data, cmd, ping],
        pong,
        stall: std::env::var_os("BENCH_STALL").is_some(),
        log_each: std::env::var_os("BENCH_LOG_EACH").is_some(),
        ..Bench::default()
    })
}

/// `pim-bench floor-client <socket> <n> [latency]`: the raw stream floor's
/// client: reads `n` events from a plain tonic Events stream, then acks once
/// so the server sees the end. With `latency`, it also takes each event's
/// one-way latency from the timestamp in its body and prints `lat <median
/// ns> <p99 ns>` before the ack.
pub(crate) fn floor_client(socket: &str, n: u64, latency: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = pim_sidecar::connect_channel(Path::new(socket)).await?;
        let mut client = pb::plugin_session_client::PluginSessionClient::new(channel)
            .max_decoding_message_size(pim_sidecar::proto::limits::MAX_MESSAGE_BYTES);
        let mut stream = client
            .events(pb::EventsRequest::default())
            .await?
            .into_inner();
        let mut seen = 0;
        let mut samples = Vec::new();
        while seen < n {
            let Some(batch) = stream.message().await? else {
                anyhow::bail!("the floor stream ended after {seen} of {n}");
            };
            if latency {
                let now = mono_ns();
                for event in &batch.events {
                    if let Some(pb::event::Event::Payload(p)) = &event.event {
                        if let Some(sent) = p.body.get(..8) {
                            let sent = u64::from_le_bytes(sent.try_into().expect("8 bytes"));
                            samples.push(now.saturating_sub(sent));
                        }
                    }
                }
            }
            seen += batch.events.len() as u64;
        }
        if latency {
            println!("lat {}", encode(warm(&mut samples)));
        }
        client
            .ack(pb::AckRequest {
                session_id: String::new(),
                seq: seen,
            })
            .await?;
        Ok(())
    })
}
