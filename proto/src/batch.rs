//! An Events batch read one event at a time from the message's own bytes
//! ([`EventBatch`], the client's side), and written straight from the
//! host's events ([`OutgoingBatch`], the host's side).
//!
//! Decoded by prost, an `EventsResponse` is a `Vec` of events, each
//! payload's kind a `String` of its own: the whole batch (up to
//! [`MAX_BATCH_EVENTS`](crate::limits::MAX_BATCH_EVENTS) events) is decoded
//! before its first event can be handled, with allocations for every event.
//! An [`EventBatch`] keeps the message's bytes and reads an event when the
//! next one is asked for: a payload's kind is borrowed from the batch and
//! its body is a slice of it (a reference count, no copy).
//!
//! Only the encoding that protobuf libraries write for a payload event
//! (its fields in order, each once) is read here; an event encoded any
//! other way (another kind of event, an unknown field, a field twice) is
//! decoded by prost, so each event a reader gets is what prost would give
//! it. Each payload is checked against the wire's limits by
//! [`payload_fields`], as [`SequencedEvent`]'s
//! conversion checks it, with the same errors.
//!
//! One difference from decoding the whole batch first: in a batch that is
//! not valid protobuf, the events before the fault are read (and a reader
//! such as the Rust SDK hands them over) before the error, where prost
//! refuses the whole batch. The host never sends such a batch; a client
//! that meets one drops the stream, and what it did not ack is sent
//! again.

use std::ops::Range;

use bytes::{BufMut, Bytes};
use pim_core::NodeId;
use prost::encoding::{
    decode_key, decode_varint, encode_varint, encoded_len_varint, skip_field, DecodeContext,
    WireType,
};
use prost::Message;

use crate::convert::{payload_fields, PluginEvent, SequencedEvent};
use crate::{pb, InvalidField};

// Keys are (field << 3) | wire type. In `EventsResponse`: `events`
// (length-delimited); in `Event`: `seq` (varint), `payload`
// (length-delimited); in `Payload`: `src`, `kind`, `body` (each
// length-delimited).
const EVENTS_KEY: u8 = 0x0a;
const SEQ_KEY: u8 = 0x08;
const PAYLOAD_KEY: u8 = 0x12;
const SRC_KEY: u8 = 0x0a;
const KIND_KEY: u8 = 0x12;
const BODY_KEY: u8 = 0x1a;

/// One `EventsResponse` as it came off the wire; [`events`](Self::events)
/// reads its events in order.
#[derive(Debug, Clone, Default)]
pub struct EventBatch {
    buf: Bytes,
}

impl EventBatch {
    /// The batch encoded in `buf` (an `EventsResponse`). Nothing is checked
    /// until the events are read.
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// The batch's size on the wire, in bytes.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// The batch's events, read one at a time. An event that does not
    /// decode or breaks a limit is an `Err` and the next event follows; a
    /// batch whose framing is broken (so that the next event cannot be
    /// found) gives one `Err` and ends.
    pub fn events(&self) -> BatchEvents<'_> {
        BatchEvents {
            buf: &self.buf,
            pos: 0,
        }
    }
}

/// One event of an [`EventBatch`]: a payload read in place, or anything
/// else as prost decodes it (so every event has a variant to go to, and a
/// reader's `match` is complete with these two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEvent<'a> {
    /// A payload, within the wire's limits.
    Payload {
        /// The event's sequence number (at least 1).
        seq: u64,
        /// Sending node.
        src: NodeId,
        /// Payload kind, borrowed from the batch.
        kind: &'a str,
        /// Payload body, a slice of the batch.
        body: Bytes,
    },
    /// Any other event, or a payload in another encoding, as prost decodes
    /// it: not checked yet (convert it with
    /// [`SequencedEvent::try_from`](crate::convert::SequencedEvent)).
    Other(pb::Event),
}

/// The events of an [`EventBatch`], from [`EventBatch::events`].
#[derive(Debug)]
pub struct BatchEvents<'a> {
    buf: &'a Bytes,
    /// Where the next top-level field starts.
    pos: usize,
}

impl<'a> Iterator for BatchEvents<'a> {
    type Item = Result<BatchEvent<'a>, InvalidField>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos < self.buf.len() {
            match self.next_field() {
                Ok(Some(range)) => return Some(event(self.buf, range)),
                Ok(None) => {}
                Err(e) => {
                    self.pos = self.buf.len();
                    return Some(Err(InvalidField::new(
                        "events",
                        format!("the batch is not a valid EventsResponse: {e}"),
                    )));
                }
            }
        }
        None
    }
}

impl std::iter::FusedIterator for BatchEvents<'_> {}

impl BatchEvents<'_> {
    /// Reads the top-level field at `pos`: the range of an event's bytes,
    /// or `None` for a field an `EventsResponse` does not know (skipped,
    /// as prost skips it).
    fn next_field(&mut self) -> Result<Option<Range<usize>>, String> {
        let mut rest = &self.buf[self.pos..];
        let (tag, wire_type) = decode_key(&mut rest).map_err(|e| e.to_string())?;
        let found = if tag == 1 {
            if wire_type != WireType::LengthDelimited {
                return Err(format!(
                    "field `events` has wire type {wire_type:?}, not length-delimited"
                ));
            }
            let len = decode_varint(&mut rest).map_err(|e| e.to_string())?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > rest.len() {
                return Err("an event runs past the batch's end".into());
            }
            let start = self.buf.len() - rest.len();
            rest = &rest[len..];
            Some(start..start + len)
        } else {
            skip_field(wire_type, tag, &mut rest, DecodeContext::default())
                .map_err(|e| e.to_string())?;
            None
        };
        self.pos = self.buf.len() - rest.len();
        Ok(found)
    }
}

/// The event in `buf[range]`.
fn event(buf: &Bytes, range: Range<usize>) -> Result<BatchEvent<'_>, InvalidField> {
    if let Some(payload) = payload(buf, range.clone()) {
        return payload;
    }
    pb::Event::decode(buf.slice(range))
        .map(BatchEvent::Other)
        .map_err(|e| InvalidField::new("events", format!("an event that does not decode: {e}")))
}

/// The payload event in `buf[range]` when it is encoded as protobuf
/// libraries encode one: `seq` (absent when 0), then `payload` last, its
/// `src`, `kind` and `body` in order (each absent when empty). `None` for
/// anything else, a seq of 0 or a kind that is not UTF-8 included (prost
/// decodes those, with its errors).
fn payload(buf: &Bytes, range: Range<usize>) -> Option<Result<BatchEvent<'_>, InvalidField>> {
    let end = range.end;
    let bytes = &buf[..end];
    let mut pos = range.start;
    let seq = if bytes.get(pos) == Some(&SEQ_KEY) {
        pos += 1;
        varint(bytes, &mut pos)?
    } else {
        0
    };
    if seq == 0 || bytes.get(pos) != Some(&PAYLOAD_KEY) {
        return None;
    }
    pos += 1;
    let fields = length_delimited(bytes, &mut pos)?;
    if fields.end != end {
        return None;
    }
    pos = fields.start;
    let mut take = |key: u8| {
        if bytes.get(pos) == Some(&key) {
            pos += 1;
            length_delimited(bytes, &mut pos)
        } else {
            Some(pos..pos)
        }
    };
    let (src, kind, body) = (take(SRC_KEY)?, take(KIND_KEY)?, take(BODY_KEY)?);
    if pos != end {
        return None;
    }
    let kind = std::str::from_utf8(&bytes[kind]).ok()?;
    let checked =
        payload_fields(&bytes[src], kind, &bytes[body.clone()]).map(|src| BatchEvent::Payload {
            seq,
            src,
            kind,
            body: buf.slice(body),
        });
    Some(checked)
}

/// The varint at `pos`, which moves past it.
fn varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut rest = bytes.get(*pos..)?;
    let value = decode_varint(&mut rest).ok()?;
    *pos = bytes.len() - rest.len();
    Some(value)
}

/// The range of the length-delimited value at `pos` (its length first),
/// which moves past it.
fn length_delimited(bytes: &[u8], pos: &mut usize) -> Option<Range<usize>> {
    let len = usize::try_from(varint(bytes, pos)?).ok()?;
    let start = *pos;
    let end = start.checked_add(len).filter(|&end| end <= bytes.len())?;
    *pos = end;
    Some(start..end)
}

/// Events on their way to a client, written as one `EventsResponse`
/// straight from the events themselves: a payload's node id, kind and body
/// go from the event into the encoder, with no wire message built (prost's
/// `pb::Event` owns a `String` for each kind). The bytes are those that
/// prost writes for [`to_message`](Self::to_message), in every case; the
/// host's Events call sends batches this way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingBatch {
    events: Vec<SequencedEvent>,
    /// The seq of an event sent with nothing set (0: none).
    blank: u64,
}

impl OutgoingBatch {
    /// A batch of `events`, in the order given (the host's are in strictly
    /// increasing `seq` order).
    pub fn new(events: Vec<SequencedEvent>) -> Self {
        Self { events, blank: 0 }
    }

    /// Sends the event numbered `seq`, if the batch holds it, with its
    /// `event` unset: what a client meets when a newer host sends a kind of
    /// event it does not know (test hosts use it). One event at most: a
    /// second call replaces the first, and 0 blanks none.
    pub fn blank(&mut self, seq: u64) {
        self.blank = seq;
    }

    /// The batch's events.
    pub fn events(&self) -> &[SequencedEvent] {
        &self.events
    }

    /// The batch as prost's message, which encodes to the same bytes.
    pub fn to_message(&self) -> pb::EventsResponse {
        let mut events = crate::convert::events_to_wire(&self.events);
        for ev in events.iter_mut().filter(|ev| self.is_blank(ev.seq)) {
            ev.event = None;
        }
        pb::EventsResponse { events }
    }

    /// The length of the encoded `EventsResponse` (what
    /// [`encode`](Self::encode) writes; gRPC's 5-byte frame header not
    /// included).
    pub fn encoded_len(&self) -> usize {
        self.events
            .iter()
            .map(|ev| {
                // A repeated message's element is written even when empty.
                let len = self.wire_len(ev);
                1 + encoded_len_varint(len as u64) + len
            })
            .sum()
    }

    /// Writes the batch, [`encoded_len`](Self::encoded_len) bytes, to `buf`.
    ///
    /// # Panics
    ///
    /// If `buf` cannot grow to hold them (a `BytesMut` or `Vec` always can).
    pub fn encode(&self, buf: &mut impl BufMut) {
        for ev in &self.events {
            match &ev.event {
                PluginEvent::Payload { src, kind, body } if !self.is_blank(ev.seq) => {
                    let fields = payload_len(src.as_bytes(), kind, body);
                    buf.put_u8(EVENTS_KEY);
                    encode_varint(event_len(ev.seq, fields) as u64, buf);
                    if ev.seq != 0 {
                        buf.put_u8(SEQ_KEY);
                        encode_varint(ev.seq, buf);
                    }
                    buf.put_u8(PAYLOAD_KEY);
                    encode_varint(fields as u64, buf);
                    put_field(buf, SRC_KEY, src.as_bytes());
                    put_field(buf, KIND_KEY, kind.as_bytes());
                    put_field(buf, BODY_KEY, body);
                }
                // Lifecycle events are few: prost writes them.
                _ => prost::encoding::message::encode(1, &self.wire_event(ev), buf),
            }
        }
    }

    fn is_blank(&self, seq: u64) -> bool {
        self.blank != 0 && seq == self.blank
    }

    /// The length of `ev`'s `Event` message.
    fn wire_len(&self, ev: &SequencedEvent) -> usize {
        match &ev.event {
            PluginEvent::Payload { src, kind, body } if !self.is_blank(ev.seq) => {
                event_len(ev.seq, payload_len(src.as_bytes(), kind, body))
            }
            _ => self.wire_event(ev).encoded_len(),
        }
    }

    /// `ev` as prost's message (for events other than payloads).
    fn wire_event(&self, ev: &SequencedEvent) -> pb::Event {
        if self.is_blank(ev.seq) {
            return pb::Event {
                seq: ev.seq,
                event: None,
            };
        }
        pb::Event::from(ev)
    }
}

/// The length of a `Payload` message with these fields.
fn payload_len(src: &[u8], kind: &str, body: &[u8]) -> usize {
    field_len(src.len()) + field_len(kind.len()) + field_len(body.len())
}

/// The length of an `Event` message holding `seq` and a payload of
/// `payload_len` bytes.
fn event_len(seq: u64, payload_len: usize) -> usize {
    let seq_len = if seq == 0 {
        0
    } else {
        1 + encoded_len_varint(seq)
    };
    seq_len + 1 + encoded_len_varint(payload_len as u64) + payload_len
}

/// The length of a length-delimited field of `len` bytes with a one-byte
/// key; 0 when `len` is 0 (proto3 writes no empty field).
fn field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

/// Writes a length-delimited field, unless `value` is empty.
fn put_field(buf: &mut impl BufMut, key: u8, value: &[u8]) {
    if !value.is_empty() {
        buf.put_u8(key);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

#[cfg(test)]
mod tests;
