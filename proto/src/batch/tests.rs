use bytes::Bytes;
use prost::Message;

use super::{BatchEvent, EventBatch};
use crate::convert::SequencedEvent;
use crate::limits::MAX_BODY_BYTES;
use crate::pb;

fn payload(seq: u64, src: &[u8], kind: &str, body: &[u8]) -> pb::Event {
    pb::Event {
        seq,
        event: Some(pb::event::Event::Payload(pb::Payload {
            src: Bytes::copy_from_slice(src),
            kind: kind.into(),
            body: Bytes::copy_from_slice(body),
        })),
    }
}

/// A batch of every shape of event: payloads with empty, small and
/// largest bodies, a peer forgotten, a shutdown, an event of a kind this
/// crate does not know, and payloads that break the wire's limits.
fn mixed() -> Vec<pb::Event> {
    vec![
        payload(1, &[1; 16], "a.b", b"hello"),
        payload(2, &[2; 16], "a.b", b""),
        payload(3, &[3; 16], "a.c", &vec![7; MAX_BODY_BYTES]),
        pb::Event {
            seq: 4,
            event: Some(pb::event::Event::PeerForgotten(pb::PeerForgotten {
                node: Bytes::from_static(&[4; 16]),
            })),
        },
        pb::Event {
            seq: 5,
            event: None,
        },
        payload(6, &[6; 15], "a.b", b"short src"),
        payload(7, &[7; 16], "", b"no kind"),
        payload(8, &[8; 16], "a.é", b"not ascii"),
        payload(9, &[9; 16], "a.b", &vec![9; MAX_BODY_BYTES + 1]),
        payload(0, &[10; 16], "a.b", b"seq 0"),
        pb::Event {
            seq: 11,
            event: Some(pb::event::Event::Shutdown(pb::Shutdown { grace_ms: 250 })),
        },
    ]
}

fn encode(events: Vec<pb::Event>) -> Bytes {
    pb::EventsResponse { events }.encode_to_vec().into()
}

/// What the reader gave, as the wire event it stands for.
fn as_wire(event: &BatchEvent<'_>) -> pb::Event {
    match event {
        BatchEvent::Payload {
            seq,
            src,
            kind,
            body,
        } => payload(*seq, src.as_bytes(), kind, body),
        BatchEvent::Other(ev) => ev.clone(),
    }
}

/// The reader agrees with prost on `buf`: when prost decodes the batch,
/// event by event (a payload read directly is what prost decodes and the
/// conversion accepts, an error is an event the conversion refuses);
/// when prost refuses the batch, the reader reports an error too.
#[track_caller]
fn agrees_with_prost(buf: Bytes) {
    let batch = EventBatch::new(buf.clone());
    let ours: Vec<_> = batch.events().collect();
    let Ok(theirs) = pb::EventsResponse::decode(buf.clone()) else {
        assert!(
            ours.iter().any(Result::is_err),
            "prost refuses {buf:?}, the reader gave {ours:?}"
        );
        return;
    };
    assert_eq!(ours.len(), theirs.events.len(), "{buf:?}");
    for (ours, theirs) in ours.iter().zip(theirs.events) {
        let converted = SequencedEvent::try_from(theirs.clone());
        match ours {
            Ok(ev @ BatchEvent::Payload { .. }) => {
                assert_eq!(as_wire(ev), theirs, "{buf:?}");
                assert!(converted.is_ok(), "{buf:?}: {converted:?}");
            }
            Ok(BatchEvent::Other(ev)) => assert_eq!(*ev, theirs, "{buf:?}"),
            Err(e) => assert_eq!(Err(e.clone()), converted.map(|_| ()), "{buf:?}"),
        }
    }
}

#[test]
fn payloads_are_read_in_place_and_other_events_as_prost_decodes_them() {
    let events = mixed();
    let buf = encode(events.clone());
    let batch = EventBatch::new(buf.clone());
    assert_eq!(batch.encoded_len(), buf.len());
    let read: Vec<_> = batch.events().collect();
    assert_eq!(read.len(), events.len());
    // Payloads within the limits, read directly; the body a slice of the
    // batch, not a copy.
    for (i, seq) in [(0, 1), (1, 2), (2, 3)] {
        let Ok(ev @ BatchEvent::Payload { body, .. }) = &read[i] else {
            panic!("event {seq} was not read as a payload: {:?}", read[i]);
        };
        assert_eq!(as_wire(ev), events[i]);
        if !body.is_empty() {
            let inside = buf.as_ptr_range();
            assert!(
                inside.contains(&body.as_ptr()),
                "seq {seq}: the body was copied"
            );
        }
    }
    assert_eq!(read[3], Ok(BatchEvent::Other(events[3].clone())));
    assert_eq!(read[4], Ok(BatchEvent::Other(events[4].clone())));
    // Limits broken: the conversion's own errors, naming the field.
    let field = |i: usize| read[i].as_ref().unwrap_err().field().to_owned();
    assert_eq!(field(5), "payload.src");
    assert_eq!(field(6), "payload.kind");
    assert_eq!(field(7), "payload.kind");
    assert_eq!(field(8), "payload.body");
    // A seq of 0 and a shutdown go to prost; the conversion refuses the first.
    assert_eq!(read[9], Ok(BatchEvent::Other(events[9].clone())));
    assert_eq!(read[10], Ok(BatchEvent::Other(events[10].clone())));
    agrees_with_prost(buf);
}

#[test]
fn other_encodings_of_a_payload_are_read_as_prost_reads_them() {
    let event = payload(3, &[1; 16], "a.b", b"body").encode_to_vec();
    let inner = pb::Payload {
        src: Bytes::from_static(&[1; 16]),
        kind: "a.b".into(),
        body: Bytes::from_static(b"body"),
    }
    .encode_to_vec();
    let wrap = |event: Vec<u8>| {
        let mut buf = vec![0x0a];
        prost::encoding::encode_varint(event.len() as u64, &mut buf);
        buf.extend(event);
        Bytes::from(buf)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // The payload before the seq.
        ("fields out of order", {
            let mut e = vec![0x12, inner.len() as u8];
            e.extend(&inner);
            e.extend([0x08, 3]);
            e
        }),
        // An unknown field after the payload (a newer host's).
        ("an unknown field", {
            let mut e = event.clone();
            e.extend([0x28, 1]);
            e
        }),
        // The seq twice: prost keeps the last.
        ("a repeated seq", {
            let mut e = vec![0x08, 9];
            e.extend(&event);
            e
        }),
        // The kind twice inside the payload.
        ("a repeated kind", {
            let mut p = inner.clone();
            p.extend([0x12, 3, b'x', b'.', b'y']);
            let mut e = vec![0x08, 3, 0x12, p.len() as u8];
            e.extend(p);
            e
        }),
        ("a kind that is not UTF-8", {
            let mut e = event.clone();
            let at = e.windows(3).position(|w| w == b"a.b").unwrap();
            e[at] = 0xff;
            e
        }),
        ("a truncated event", event[..event.len() - 2].to_vec()),
    ];
    for (what, e) in cases {
        let buf = wrap(e);
        let batch = EventBatch::new(buf.clone());
        let read: Vec<_> = batch.events().collect();
        assert!(
            !matches!(read.as_slice(), [Ok(BatchEvent::Payload { .. })]),
            "{what}: read directly"
        );
        agrees_with_prost(buf);
    }
    // Fields an EventsResponse does not know are skipped, as prost skips them.
    let mut buf = vec![0x10, 5];
    buf.extend(&wrap(event.clone()));
    buf.extend([0x1a, 2, 0, 0]);
    let batch = EventBatch::new(buf.clone().into());
    let read: Vec<_> = batch.events().collect();
    assert!(matches!(
        read.as_slice(),
        [Ok(BatchEvent::Payload { seq: 3, .. })]
    ));
    agrees_with_prost(buf.into());
}

/// Every byte of a small batch replaced by values that matter to the
/// encoding, and every truncation: the reader and prost agree on each.
#[test]
fn the_reader_agrees_with_prost_on_every_corruption_of_a_batch() {
    let buf = encode(vec![
        payload(1, &[1; 16], "a.b", b"xy"),
        payload(300, &[2; 16], "c.d", b""),
        pb::Event {
            seq: 301,
            event: Some(pb::event::Event::Shutdown(pb::Shutdown { grace_ms: 5 })),
        },
    ]);
    // Keys of every wire type (groups included), lengths, varint
    // continuation bytes, and bytes that are not UTF-8.
    const VALUES: [u8; 16] = [
        0x00, 0x01, 0x02, 0x03, 0x04, 0x07, 0x08, 0x0a, 0x0b, 0x0c, 0x10, 0x12, 0x1a, 0x80, 0xc3,
        0xff,
    ];
    let (mut cases, mut read_directly) = (0, 0);
    let mut check = |bad: Bytes| {
        let batch = EventBatch::new(bad.clone());
        read_directly += batch
            .events()
            .filter(|e| matches!(e, Ok(BatchEvent::Payload { .. })))
            .count();
        agrees_with_prost(bad);
        cases += 1;
    };
    for at in 0..buf.len() {
        for value in VALUES {
            let mut bad = buf.to_vec();
            bad[at] = value;
            check(bad.into());
        }
        check(buf.slice(..at));
    }
    assert_eq!(cases, buf.len() * (VALUES.len() + 1));
    // Most corruptions leave the other events' payloads as they were: the
    // direct reading is what was compared, not only prost's.
    assert!(
        read_directly > cases,
        "{read_directly} payloads read directly in {cases} cases"
    );
}

/// Encodings at the edges: the reader reads some directly and gives the
/// rest to prost, and agrees with prost on all.
#[test]
fn edge_encodings_agree_with_prost() {
    let wrap = |event: &[u8]| {
        let mut buf = vec![0x0a];
        prost::encoding::encode_varint(event.len() as u64, &mut buf);
        buf.extend(event);
        Bytes::from(buf)
    };
    let src = [0x0a, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let fields = |extra: &[u8]| {
        let mut p = src.to_vec();
        p.extend([0x12, 3, b'a', b'.', b'b']);
        p.extend(extra);
        p
    };
    let event = |seq: &[u8], payload: &[u8]| {
        let mut e = seq.to_vec();
        e.push(0x12);
        prost::encoding::encode_varint(payload.len() as u64, &mut e);
        e.extend(payload);
        e
    };
    let max_seq = {
        let mut k = vec![0x08];
        prost::encoding::encode_varint(u64::MAX, &mut k);
        k
    };
    // (what, the event, read directly?)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("the largest seq", event(&max_seq, &fields(&[])), true),
        (
            "an empty body written out",
            event(&[0x08, 1], &fields(&[0x1a, 0])),
            true,
        ),
        ("an empty payload", event(&[0x08, 1], &[]), false),
        (
            "a seq key written long",
            event(&[0x88, 0x00, 1], &fields(&[])),
            false,
        ),
        (
            "a seq written long",
            event(&[0x08, 0x81, 0x00], &fields(&[])),
            true,
        ),
        (
            "an unknown field in the payload",
            event(&[0x08, 1], &fields(&[0x20, 7])),
            false,
        ),
        (
            "a group in the payload",
            event(&[0x08, 1], &fields(&[0x23, 0x24])),
            false,
        ),
    ];
    for (what, e, direct) in cases {
        let buf = wrap(&e);
        let batch = EventBatch::new(buf.clone());
        let read: Vec<_> = batch.events().collect();
        assert_eq!(
            matches!(read.as_slice(), [Ok(BatchEvent::Payload { .. })]),
            direct,
            "{what}: {read:?}"
        );
        agrees_with_prost(buf);
    }
    // An empty payload fails as the conversion fails it, on the src.
    let buf = wrap(&event(&[0x08, 1], &[]));
    let batch = EventBatch::new(buf);
    let read: Vec<_> = batch.events().collect();
    assert!(
        matches!(read.as_slice(), [Err(e)] if e.field() == "payload.src"),
        "{read:?}"
    );
}

/// Every shape of event a host sends: payloads with bodies and seqs at
/// each varint length's edges, kinds borrowed and owned, the longest kind
/// and body, and lifecycle events.
fn outgoing() -> Vec<SequencedEvent> {
    use std::borrow::Cow;
    use std::time::Duration;

    use crate::convert::PluginEvent;
    use crate::limits::MAX_KIND_BYTES;

    let node = |b: u8| pim_core::NodeId::from_bytes([b; 16]);
    let kinds: [Cow<'static, str>; 3] = [
        Cow::Borrowed("a.b"),
        Cow::Owned("a.".repeat(MAX_KIND_BYTES / 2) + "c"),
        Cow::Owned("x".repeat(127)),
    ];
    let bodies = [0, 1, 127, 128, 16_383, 16_384, MAX_BODY_BYTES];
    let seqs = [1, 127, 128, 16_383, 16_384, u64::MAX / 2, u64::MAX];
    let mut events = Vec::new();
    for (i, (&len, &seq)) in bodies.iter().zip(&seqs).enumerate() {
        events.push(SequencedEvent {
            seq,
            event: PluginEvent::Payload {
                src: node(i as u8),
                kind: kinds[i % kinds.len()].clone(),
                body: Bytes::from(vec![i as u8; len]),
            },
        });
    }
    // An empty kind (never queued by a host: it breaks the wire's limits),
    // which proto3 leaves out.
    events.push(SequencedEvent {
        seq: 19,
        event: PluginEvent::Payload {
            src: node(19),
            kind: Cow::Borrowed(""),
            body: Bytes::from_static(b"no kind"),
        },
    });
    events.push(SequencedEvent {
        seq: 20,
        event: PluginEvent::PeerForgotten { node: node(20) },
    });
    for (seq, ms) in [(21, 0), (22, 250), (23, u64::from(u32::MAX) + 5)] {
        events.push(SequencedEvent {
            seq,
            event: PluginEvent::Shutdown {
                grace: Duration::from_millis(ms),
            },
        });
    }
    events
}

/// The host's writer gives, for every shape of event, the bytes prost
/// writes for the same batch as wire messages, and its length is theirs.
#[test]
fn the_writer_writes_what_prost_writes() {
    use super::OutgoingBatch;
    use crate::convert::PluginEvent;

    let events = outgoing();
    // Each alone, then all together.
    let mut batches: Vec<Vec<SequencedEvent>> = events.iter().map(|e| vec![e.clone()]).collect();
    batches.push(events.clone());
    batches.push(Vec::new());
    for events in batches {
        let batch = OutgoingBatch::new(events.clone());
        let theirs = pb::EventsResponse {
            events: crate::convert::events_to_wire(&events),
        };
        assert_eq!(batch.to_message(), theirs);
        let mut ours = Vec::new();
        batch.encode(&mut ours);
        assert_eq!(ours, theirs.encode_to_vec(), "{events:?}");
        assert_eq!(batch.encoded_len(), ours.len());
        assert_eq!(batch.events(), events.as_slice());
        // And the client's reader reads it back as sent (an event that
        // breaks the wire's limits as the same error).
        let read: Vec<Result<SequencedEvent, String>> = EventBatch::new(ours.into())
            .events()
            .map(|ev| match ev {
                Ok(BatchEvent::Payload {
                    seq,
                    src,
                    kind,
                    body,
                }) => Ok(SequencedEvent {
                    seq,
                    event: crate::convert::PluginEvent::Payload {
                        src,
                        kind: kind.to_owned().into(),
                        body,
                    },
                }),
                Ok(BatchEvent::Other(ev)) => {
                    SequencedEvent::try_from(ev).map_err(|e| e.field().to_owned())
                }
                Err(e) => Err(e.field().to_owned()),
            })
            .collect();
        let sent: Vec<Result<SequencedEvent, String>> = events
            .iter()
            .map(|ev| {
                SequencedEvent::try_from(pb::Event::from(ev)).map_err(|e| e.field().to_owned())
            })
            .collect();
        assert_eq!(read, sent);
        let broken: Vec<_> = read.iter().filter_map(|r| r.as_ref().err()).collect();
        let empty_kind = events
            .iter()
            .filter(|e| matches!(&e.event, PluginEvent::Payload { kind, .. } if kind.is_empty()))
            .count();
        assert_eq!(broken, vec!["payload.kind"; empty_kind]);
    }
}

/// A blanked event goes out with nothing set, whatever it was, as prost
/// writes an `Event` holding only its seq; the rest of the batch is as
/// before. Events of seq 0 (never sent by a host) are written as prost
/// writes them too, blank or not.
#[test]
fn a_blanked_event_is_written_as_prost_writes_it() {
    use super::OutgoingBatch;

    let mut events = outgoing();
    events.push(SequencedEvent {
        seq: 0,
        event: events[0].event.clone(),
    });
    for blank in events.iter().map(|e| e.seq).chain([0, 999]) {
        let mut batch = OutgoingBatch::new(events.clone());
        batch.blank(blank);
        let mut theirs = pb::EventsResponse {
            events: crate::convert::events_to_wire(&events),
        };
        for ev in &mut theirs.events {
            if blank != 0 && ev.seq == blank {
                ev.event = None;
            }
        }
        assert_eq!(batch.to_message(), theirs, "blank {blank}");
        let mut ours = Vec::new();
        batch.encode(&mut ours);
        assert_eq!(ours, theirs.encode_to_vec(), "blank {blank}");
        assert_eq!(batch.encoded_len(), ours.len(), "blank {blank}");
    }
}
