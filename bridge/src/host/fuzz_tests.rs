//! Randomized tests: no input makes the host panic, and the session state
//! machine keeps its invariants under any sequence of calls. The seed is
//! printed; `PIM_FUZZ_SEED=<n>` replays a run.

use std::sync::Arc;

use bytes::Bytes;
use pim_plugin_proto::pb::control_sender_server::ControlSender;
use pim_plugin_proto::pb::peer_directory_server::PeerDirectory;
use pim_plugin_proto::pb::plugin_session_server::PluginSession;
use pim_plugin_proto::{convert, pb};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::{Host, HostServices};
use crate::config::QueueLimits;
use crate::queue::EventQueue;
use crate::testkit::RecordingPorts;
use crate::SidecarConfig;

struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("PIM_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("PIM_FUZZ_SEED={seed}");
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A length near an interesting boundary, or a small random one.
    fn len(&mut self) -> usize {
        const EDGES: [usize; 12] = [0, 1, 15, 16, 17, 31, 32, 33, 255, 256, 65_535, 65_536];
        if self.below(2) == 0 {
            EDGES[self.below(EDGES.len() as u64) as usize]
        } else {
            self.below(40) as usize
        }
    }

    fn bytes(&mut self) -> Bytes {
        let len = self.len();
        Bytes::from((0..len).map(|_| self.next() as u8).collect::<Vec<u8>>())
    }

    fn string(&mut self) -> String {
        const CHARS: [char; 8] = ['a', '.', 'z', '0', 'é', '\u{7f}', '-', '💥'];
        let len = self.len();
        (0..len)
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
            .collect()
    }

    fn frame(&mut self) -> Option<pb::ControlFrame> {
        use pb::control_frame::Frame as F;
        let frame = match self.below(8) {
            0 => return None,
            1 => None,
            2 => Some(F::Goodbye(pb::Goodbye {
                departing_id: self.bytes(),
                reason: self.next() as u32 % 512,
            })),
            3 => Some(F::Rekey(pb::Rekey {})),
            4 => Some(F::Ping(pb::Ping { nonce: self.next() })),
            5 => Some(F::PeerInfo(pb::PeerInfo {
                x25519: self.bytes(),
                friendly_name: self.string(),
            })),
            _ => Some(F::PluginPayload(pb::PluginPayload {
                kind: if self.below(2) == 0 {
                    format!("fuzz.{}", self.string())
                } else {
                    self.string()
                },
                body: self.bytes(),
            })),
        };
        Some(pb::ControlFrame { frame })
    }
}

#[test]
fn no_wire_input_makes_a_conversion_panic() {
    let mut rng = Rng::seeded();
    for _ in 0..20_000 {
        let raw = rng.bytes();
        if let Ok(msg) = pb::Event::decode(raw.clone()) {
            let _ = convert::SequencedEvent::try_from(msg);
        }
        if let Ok(msg) = pb::WatchResponse::decode(raw.clone()) {
            let _ = convert::WatchEvent::try_from(msg);
        }
        if let Ok(msg) = pb::SendRoutedRequest::decode(raw.clone()) {
            let _ = convert::node_id("dst", &msg.dst);
            if let Some(frame) = msg.frame {
                let _ = pim_protocol::ControlFrame::try_from(frame);
            }
        }
        if let Ok(msg) = pb::RegisterRequest::decode(raw) {
            let _ = convert::plugin_name("plugin_name", &msg.plugin_name);
        }
        if let Some(frame) = rng.frame() {
            if let Ok(domain) = pim_protocol::ControlFrame::try_from(frame.clone()) {
                // What passes the checks round-trips exactly.
                assert_eq!(pb::ControlFrame::from(domain), frame);
            }
        }
        let _ = convert::capability("c", rng.next() as i32);
        let _ = convert::peer_info_source("v", rng.next() as i32);
    }
}

#[tokio::test]
async fn any_sequence_of_calls_keeps_the_session_invariants() {
    let mut rng = Rng::seeded();
    let mut config = SidecarConfig::external("fuzz", ["fuzz.a", "fuzz.b"], "/nonexistent");
    config.queue = QueueLimits {
        max_events: 64,
        max_bytes: 1024 * 1024,
    };
    let queue = Arc::new(EventQueue::new(config.queue));
    let ports = RecordingPorts::new([1; 32]);
    let stopping = CancellationToken::new();
    let ctx = ports.context(std::path::Path::new("/tmp"), stopping.clone());
    let host = Arc::new(Host::new(
        "fuzz",
        &["fuzz.a", "fuzz.b"],
        config,
        ctx,
        "/tmp".into(),
        queue.clone(),
        stopping.clone(),
    ));
    let svc = HostServices(host.clone());
    let mut sessions: Vec<String> = vec![String::new(), "garbage".into()];
    let mut streams = Vec::new();
    let mut lifecycle_pushed = 0;
    for _ in 0..3_000 {
        let session_id = sessions[rng.below(sessions.len() as u64) as usize].clone();
        match rng.below(9) {
            0 => {
                let kinds = match rng.below(3) {
                    0 => vec!["fuzz.a".into(), "fuzz.b".into()],
                    1 => vec!["fuzz.b".into(), "fuzz.a".into(), "fuzz.a".into()],
                    _ => vec![rng.string()],
                };
                let name = if rng.below(4) == 0 {
                    rng.string()
                } else {
                    "fuzz".into()
                };
                let req = pb::RegisterRequest {
                    protocol_version: rng.below(3) as u32,
                    plugin_name: name,
                    payload_kinds: kinds,
                    ..Default::default()
                };
                if let Ok(resp) = svc.register(Request::new(req)).await {
                    sessions.push(resp.into_inner().session_id);
                }
            }
            1 => {
                if let Ok(stream) = svc
                    .events(Request::new(pb::EventsRequest { session_id }))
                    .await
                {
                    streams.push(stream.into_inner());
                }
            }
            2 => {
                let seq = match rng.below(3) {
                    0 => rng.next(),
                    1 => queue.last_seq(),
                    _ => queue.acked().saturating_sub(1),
                };
                let before = queue.acked();
                let _ = svc
                    .ack(Request::new(pb::AckRequest { session_id, seq }))
                    .await;
                assert!(queue.acked() >= before, "the ack position never moves back");
            }
            3 => {
                let req = pb::LookupNameRequest {
                    session_id,
                    node: rng.bytes(),
                };
                let _ = svc.lookup_name(Request::new(req)).await;
            }
            4 => {
                let req = pb::SendRoutedRequest {
                    session_id,
                    dst: rng.bytes(),
                    frame: rng.frame(),
                };
                let _ = svc.send_routed(Request::new(req)).await;
            }
            5 | 6 => {
                let kind = if rng.below(2) == 0 { "fuzz.a" } else { "other" };
                queue.push(convert::PluginEvent::Payload {
                    src: pim_core::NodeId::from_bytes([2; 16]),
                    kind: crate::queue::intern_kind(kind, &["fuzz.a", "fuzz.b"]),
                    body: rng.bytes(),
                });
            }
            7 => {
                lifecycle_pushed += 1;
                queue.push(convert::PluginEvent::PeerForgotten {
                    node: pim_core::NodeId::from_bytes([3; 16]),
                });
            }
            _ => {
                if !streams.is_empty() {
                    drop(streams.swap_remove(rng.below(streams.len() as u64) as usize));
                }
            }
        }
        let stats = queue.stats();
        assert!(stats.acked_seq <= queue.last_seq());
        assert!(stats.bytes <= 1024 * 1024);
        assert!(
            stats.depth <= 64 + lifecycle_pushed,
            "only lifecycle events may exceed the bound: depth {}",
            stats.depth
        );
        tokio::task::yield_now().await;
    }
    // Every payload that was sent to the ports passed the namespace rule.
    for call in ports.calls() {
        if let crate::testkit::PortCall::SendRouted { frame, .. } = call {
            match frame {
                pim_protocol::ControlFrame::PluginPayload { kind, .. } => {
                    assert!(kind.starts_with("fuzz."), "{kind} escaped the namespace")
                }
                other => panic!("{other:?} sent without RAW_CONTROL"),
            }
        }
    }
    stopping.cancel();
}
