use super::*;

fn node(b: u8) -> NodeId {
    NodeId::from_bytes([b; 16])
}

fn every_frame() -> Vec<ControlFrame> {
    vec![
        ControlFrame::Goodbye {
            departing_id: node(1),
            reason: 255,
        },
        ControlFrame::Rekey,
        ControlFrame::Ping { nonce: u64::MAX },
        ControlFrame::Pong { nonce: 7 },
        ControlFrame::PeerInfo {
            x25519_pub: [9; 32],
            friendly_name: "ünïcode name".into(),
        },
        ControlFrame::PluginPayload {
            kind: "echo.ping".into(),
            body: Bytes::from_static(b"hello"),
        },
        ControlFrame::PluginPayload {
            kind: "k".repeat(MAX_KIND_BYTES),
            body: Bytes::from(vec![0xAB; MAX_BODY_BYTES]),
        },
    ]
}

#[test]
fn every_control_frame_variant_round_trips() {
    for frame in every_frame() {
        let wire = pb::ControlFrame::from(frame.clone());
        assert_eq!(ControlFrame::try_from(wire).unwrap(), frame);
    }
}

#[test]
fn every_event_variant_round_trips() {
    let events = [
        PluginEvent::Payload {
            src: node(3),
            kind: std::borrow::Cow::Borrowed("echo.ping"),
            body: Bytes::from_static(b"x"),
        },
        PluginEvent::PeerForgotten { node: node(4) },
        PluginEvent::Shutdown {
            grace: Duration::from_millis(1500),
        },
    ];
    for (i, event) in events.into_iter().enumerate() {
        let ev = SequencedEvent {
            seq: i as u64 + 1,
            event,
        };
        assert_eq!(SequencedEvent::try_from(pb::Event::from(&ev)).unwrap(), ev);
    }
}

#[test]
fn every_watch_event_round_trips() {
    for via in [PeerInfoSource::Direct, PeerInfoSource::Routed] {
        let seen = PeerDirectoryEvent::Seen {
            node_id: node(5),
            x25519_pub: [6; 32],
            name: "bob".into(),
            via,
        };
        match WatchEvent::try_from(pb::WatchResponse::from(&seen)).unwrap() {
            WatchEvent::Peer(PeerDirectoryEvent::Seen {
                node_id,
                x25519_pub,
                name,
                via: got,
            }) => {
                assert_eq!(
                    (node_id, x25519_pub, name.as_str(), got),
                    (node(5), [6; 32], "bob", via)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let forgotten = PeerDirectoryEvent::Forgotten { node_id: node(8) };
    match WatchEvent::try_from(pb::WatchResponse::from(&forgotten)).unwrap() {
        WatchEvent::Peer(PeerDirectoryEvent::Forgotten { node_id }) => assert_eq!(node_id, node(8)),
        other => panic!("unexpected {other:?}"),
    }
    let lagged = pb::WatchResponse {
        event: Some(pb::watch_response::Event::Lagged(pb::WatchLagged {
            missed: 3,
        })),
    };
    assert!(matches!(
        WatchEvent::try_from(lagged).unwrap(),
        WatchEvent::Lagged { missed: 3 }
    ));
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, InvalidField>, field: &str, needle: &str) {
    let err = result.expect_err("the value breaks a limit and must be rejected");
    assert_eq!(err.field(), field, "wrong field in {err}");
    assert!(
        err.to_string().contains(needle),
        "`{err}` does not mention `{needle}`"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains(field));
}

fn payload(kind: &str, body: Vec<u8>) -> pb::ControlFrame {
    pb::ControlFrame {
        frame: Some(pb::control_frame::Frame::PluginPayload(pb::PluginPayload {
            kind: kind.into(),
            body: body.into(),
        })),
    }
}

#[test]
fn node_id_must_be_16_bytes() {
    assert_invalid(node_id("dst", &[0; 15]), "dst", "exactly 16 bytes, got 15");
    assert_invalid(node_id("dst", &[0; 17]), "dst", "got 17");
    assert_invalid(node_id("dst", &[]), "dst", "got 0");
    let goodbye = pb::ControlFrame {
        frame: Some(pb::control_frame::Frame::Goodbye(pb::Goodbye {
            departing_id: Bytes::from_static(&[1; 3]),
            reason: 0,
        })),
    };
    assert_invalid(
        ControlFrame::try_from(goodbye).map_err(|e| e.within("frame")),
        "frame.goodbye.departing_id",
        "exactly 16 bytes",
    );
}

#[test]
fn x25519_key_must_be_32_bytes() {
    let info = pb::ControlFrame {
        frame: Some(pb::control_frame::Frame::PeerInfo(pb::PeerInfo {
            x25519: Bytes::from_static(&[1; 31]),
            friendly_name: String::new(),
        })),
    };
    assert_invalid(
        ControlFrame::try_from(info),
        "peer_info.x25519",
        "exactly 32 bytes, got 31",
    );
}

#[test]
fn kind_must_be_1_to_255_ascii_bytes() {
    assert_invalid(
        ControlFrame::try_from(payload("", vec![])),
        "plugin_payload.kind",
        "1..=255 bytes, got 0",
    );
    assert_invalid(
        ControlFrame::try_from(payload(&"k".repeat(256), vec![])),
        "plugin_payload.kind",
        "got 256",
    );
    assert_invalid(
        ControlFrame::try_from(payload("echo.pïng", vec![])),
        "plugin_payload.kind",
        "non-ASCII byte at offset 6",
    );
}

#[test]
fn body_must_be_at_most_65535_bytes() {
    assert_invalid(
        ControlFrame::try_from(payload("a.b", vec![0; MAX_BODY_BYTES + 1])),
        "plugin_payload.body",
        "at most 65535 bytes, got 65536",
    );
}

#[test]
fn friendly_name_must_be_at_most_255_bytes() {
    let info = pb::ControlFrame {
        frame: Some(pb::control_frame::Frame::PeerInfo(pb::PeerInfo {
            x25519: Bytes::from_static(&[1; 32]),
            friendly_name: "é".repeat(128),
        })),
    };
    assert_invalid(
        ControlFrame::try_from(info),
        "peer_info.friendly_name",
        "at most 255 bytes, got 256",
    );
}

#[test]
fn reason_must_be_at_most_255() {
    let goodbye = pb::ControlFrame {
        frame: Some(pb::control_frame::Frame::Goodbye(pb::Goodbye {
            departing_id: Bytes::from_static(&[1; 16]),
            reason: 256,
        })),
    };
    assert_invalid(
        ControlFrame::try_from(goodbye),
        "goodbye.reason",
        "0..=255, got 256",
    );
}

#[test]
fn missing_oneofs_are_named() {
    assert_invalid(
        ControlFrame::try_from(pb::ControlFrame { frame: None }),
        "frame",
        "required",
    );
    assert_invalid(
        SequencedEvent::try_from(pb::Event {
            seq: 1,
            event: None,
        }),
        "event",
        "required",
    );
    assert_invalid(
        WatchEvent::try_from(pb::WatchResponse { event: None }),
        "event",
        "required",
    );
}

#[test]
fn events_are_checked_like_frames() {
    let bad = pb::Event {
        seq: 1,
        event: Some(pb::event::Event::Payload(pb::Payload {
            src: Bytes::from_static(&[0; 16]),
            kind: "x".repeat(300),
            body: Bytes::new(),
        })),
    };
    assert_invalid(SequencedEvent::try_from(bad), "payload.kind", "got 300");
    let zero = pb::Event {
        seq: 0,
        event: Some(pb::event::Event::Shutdown(pb::Shutdown { grace_ms: 1 })),
    };
    assert_invalid(SequencedEvent::try_from(zero), "seq", "start at 1");
}

#[test]
fn unknown_enum_values_are_rejected() {
    assert_invalid(
        peer_info_source("seen.via", 9),
        "seen.via",
        "unknown PeerInfoSource value 9",
    );
    assert_invalid(peer_info_source("seen.via", 0), "seen.via", "UNSPECIFIED");
    assert_invalid(
        capability("granted", 42),
        "granted",
        "unknown Capability value 42",
    );
    assert_eq!(
        capability("granted", 1).unwrap(),
        pb::Capability::SigningSeed
    );
}

#[test]
fn plugin_names_are_safe_file_names() {
    assert!(plugin_name("plugin_name", "echo-2_x").is_ok());
    assert_invalid(
        plugin_name("plugin_name", ""),
        "plugin_name",
        "1..=64 bytes, got 0",
    );
    assert_invalid(
        plugin_name("plugin_name", "../etc"),
        "plugin_name",
        "only ASCII letters",
    );
    assert_invalid(
        plugin_name("plugin_name", &"a".repeat(65)),
        "plugin_name",
        "got 65",
    );
}
