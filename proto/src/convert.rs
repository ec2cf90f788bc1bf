//! Every conversion between `pim.plugin.v1` wire messages and domain types.
//!
//! Wire → domain is `TryFrom` (or a checking function) and enforces the
//! limits in [`crate::limits`]; domain → wire is `From`.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use pim_core::NodeId;
use pim_plugin::{PeerDirectoryEvent, PeerInfoSource};
use pim_protocol::ControlFrame;

use crate::limits::{
    KEY_BYTES, MAX_BODY_BYTES, MAX_KINDS, MAX_KIND_BYTES, MAX_NAME_BYTES, MAX_PLUGIN_NAME_BYTES,
    MAX_REASON, NODE_ID_BYTES,
};
use crate::{pb, InvalidField};

/// Checks a node id: exactly 16 bytes.
pub fn node_id(field: &str, bytes: &[u8]) -> Result<NodeId, InvalidField> {
    let raw: [u8; NODE_ID_BYTES] = bytes.try_into().map_err(|_| {
        InvalidField::new(
            field,
            format!(
                "a node id is exactly {NODE_ID_BYTES} bytes, got {}",
                bytes.len()
            ),
        )
    })?;
    Ok(NodeId::from_bytes(raw))
}

/// Checks a 32-byte key (an X25519 public key or a signing seed).
pub fn key(field: &str, bytes: &[u8]) -> Result<[u8; KEY_BYTES], InvalidField> {
    bytes.try_into().map_err(|_| {
        InvalidField::new(
            field,
            format!("a key is exactly {KEY_BYTES} bytes, got {}", bytes.len()),
        )
    })
}

/// Checks a payload kind: 1..=255 bytes, all ASCII.
pub fn payload_kind(field: &str, kind: &str) -> Result<(), InvalidField> {
    if kind.is_empty() || kind.len() > MAX_KIND_BYTES {
        return Err(InvalidField::new(
            field,
            format!("a kind is 1..={MAX_KIND_BYTES} bytes, got {}", kind.len()),
        ));
    }
    if let Some(pos) = kind.bytes().position(|b| !b.is_ascii()) {
        return Err(InvalidField::new(
            field,
            format!("a kind is ASCII, found a non-ASCII byte at offset {pos}"),
        ));
    }
    Ok(())
}

/// Checks a payload body: at most 65535 bytes.
pub fn payload_body(field: &str, body: &[u8]) -> Result<(), InvalidField> {
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidField::new(
            field,
            format!(
                "a body is at most {MAX_BODY_BYTES} bytes, got {}",
                body.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a friendly name: at most 255 bytes of UTF-8.
pub fn friendly_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.len() > MAX_NAME_BYTES {
        return Err(InvalidField::new(
            field,
            format!(
                "a name is at most {MAX_NAME_BYTES} bytes, got {}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a free-text field: at most `max` bytes.
pub fn bounded_text(field: &str, text: &str, max: usize) -> Result<(), InvalidField> {
    if text.len() > max {
        return Err(InvalidField::new(
            field,
            format!("is at most {max} bytes, got {}", text.len()),
        ));
    }
    Ok(())
}

/// Checks the list of payload kinds a plugin claims: 1..=64 kinds, each a
/// valid kind.
pub fn payload_kinds(field: &str, kinds: &[String]) -> Result<(), InvalidField> {
    if kinds.is_empty() || kinds.len() > MAX_KINDS {
        return Err(InvalidField::new(
            field,
            format!("a plugin claims 1..={MAX_KINDS} kinds, got {}", kinds.len()),
        ));
    }
    for (i, kind) in kinds.iter().enumerate() {
        payload_kind(&format!("{field}[{i}]"), kind)?;
    }
    Ok(())
}

/// At most `max` items of `items` for a message, each escaped and cut to
/// 64 bytes, and how many were left out: `["a", "b"] and 3 more`.
pub fn excerpt<'a>(items: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let items: Vec<&str> = items.into_iter().collect();
    let shown: Vec<String> = items
        .iter()
        .take(max)
        .map(|item| {
            let mut end = item.len().min(64);
            while !item.is_char_boundary(end) {
                end -= 1;
            }
            let cut = if end < item.len() { "…" } else { "" };
            format!("{:?}{cut}", &item[..end])
        })
        .collect();
    let mut text = format!("[{}]", shown.join(", "));
    if items.len() > max {
        text.push_str(&format!(" and {} more", items.len() - max));
    }
    text
}

/// Checks a plugin name: 1..=64 bytes of `[A-Za-z0-9_-]`, so that it is safe
/// as a socket file name and as a kind prefix.
pub fn plugin_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() || name.len() > MAX_PLUGIN_NAME_BYTES {
        return Err(InvalidField::new(
            field,
            format!(
                "a plugin name is 1..={MAX_PLUGIN_NAME_BYTES} bytes, got {}",
                name.len()
            ),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(InvalidField::new(
            field,
            "a plugin name has only ASCII letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

/// Unwraps a required message field.
pub fn required<T>(field: &str, value: Option<T>) -> Result<T, InvalidField> {
    value.ok_or_else(|| InvalidField::new(field, "is required but missing"))
}

/// One event the host delivers to a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PluginEvent {
    /// An inbound `ControlFrame::PluginPayload` for one of the plugin's kinds.
    Payload {
        /// Sending node.
        src: NodeId,
        /// Payload kind; borrowed when it is one of the plugin's static kinds.
        kind: Cow<'static, str>,
        /// Payload body.
        body: Bytes,
    },
    /// The daemon forgot this peer.
    PeerForgotten {
        /// Forgotten node.
        node: NodeId,
    },
    /// The daemon is shutting the plugin down.
    Shutdown {
        /// How long the host waits before terminating the process.
        grace: Duration,
    },
}

impl PluginEvent {
    /// Body bytes the event holds (0 for lifecycle events).
    pub fn body_len(&self) -> usize {
        match self {
            Self::Payload { body, .. } => body.len(),
            _ => 0,
        }
    }

    /// Whether the event is a payload (which overflow may drop) rather than
    /// a lifecycle event (which is never dropped).
    pub fn is_payload(&self) -> bool {
        matches!(self, Self::Payload { .. })
    }
}

/// A [`PluginEvent`] with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencedEvent {
    /// Position in the plugin's event sequence, from 1.
    pub seq: u64,
    /// The event.
    pub event: PluginEvent,
}

impl From<&SequencedEvent> for pb::Event {
    fn from(ev: &SequencedEvent) -> Self {
        events_to_wire(std::slice::from_ref(ev))
            .pop()
            .expect("events_to_wire returns one wire event for each event it is given")
    }
}

/// Checks an event's payload fields against the wire's limits, in order
/// (`payload.src`, `payload.kind`, `payload.body`); the sender's node id.
/// [`SequencedEvent`]'s conversion and [`batch`](crate::batch) both check
/// with it.
pub fn payload_fields(src: &[u8], kind: &str, body: &[u8]) -> Result<NodeId, InvalidField> {
    let src = node_id("payload.src", src)?;
    payload_kind("payload.kind", kind)?;
    payload_body("payload.body", body)?;
    Ok(src)
}

/// Wire messages for `events`, in order. All their node ids share one
/// allocation, so a batch costs one allocation for them rather than one
/// per event.
pub fn events_to_wire(events: &[SequencedEvent]) -> Vec<pb::Event> {
    let mut ids = bytes::BytesMut::with_capacity(events.len() * NODE_ID_BYTES);
    let mut id = |node: &NodeId| {
        ids.extend_from_slice(node.as_bytes());
        ids.split().freeze()
    };
    events
        .iter()
        .map(|ev| {
            use pb::event::Event as E;
            let event = match &ev.event {
                PluginEvent::Payload { src, kind, body } => E::Payload(pb::Payload {
                    src: id(src),
                    kind: kind.to_string(),
                    body: body.clone(),
                }),
                PluginEvent::PeerForgotten { node } => {
                    E::PeerForgotten(pb::PeerForgotten { node: id(node) })
                }
                PluginEvent::Shutdown { grace } => E::Shutdown(pb::Shutdown {
                    grace_ms: u32::try_from(grace.as_millis()).unwrap_or(u32::MAX),
                }),
            };
            pb::Event {
                seq: ev.seq,
                event: Some(event),
            }
        })
        .collect()
}

impl TryFrom<pb::Event> for SequencedEvent {
    type Error = InvalidField;

    fn try_from(ev: pb::Event) -> Result<Self, InvalidField> {
        use pb::event::Event as E;
        if ev.seq == 0 {
            return Err(InvalidField::new(
                "seq",
                "sequence numbers start at 1, got 0",
            ));
        }
        let event = match required("event", ev.event)? {
            E::Payload(p) => {
                let src = payload_fields(&p.src, &p.kind, &p.body)?;
                PluginEvent::Payload {
                    src,
                    kind: Cow::Owned(p.kind),
                    body: p.body,
                }
            }
            E::PeerForgotten(p) => PluginEvent::PeerForgotten {
                node: node_id("peer_forgotten.node", &p.node)?,
            },
            E::Shutdown(s) => PluginEvent::Shutdown {
                grace: Duration::from_millis(u64::from(s.grace_ms)),
            },
        };
        Ok(SequencedEvent { seq: ev.seq, event })
    }
}

impl From<ControlFrame> for pb::ControlFrame {
    fn from(frame: ControlFrame) -> Self {
        use pb::control_frame::Frame as F;
        let frame = match frame {
            ControlFrame::Goodbye {
                departing_id,
                reason,
            } => F::Goodbye(pb::Goodbye {
                departing_id: Bytes::copy_from_slice(departing_id.as_bytes()),
                reason: u32::from(reason),
            }),
            ControlFrame::Rekey => F::Rekey(pb::Rekey {}),
            ControlFrame::Ping { nonce } => F::Ping(pb::Ping { nonce }),
            ControlFrame::Pong { nonce } => F::Pong(pb::Pong { nonce }),
            ControlFrame::PeerInfo {
                x25519_pub,
                friendly_name,
            } => F::PeerInfo(pb::PeerInfo {
                x25519: Bytes::copy_from_slice(&x25519_pub),
                friendly_name,
            }),
            ControlFrame::PluginPayload { kind, body } => {
                F::PluginPayload(pb::PluginPayload { kind, body })
            }
        };
        pb::ControlFrame { frame: Some(frame) }
    }
}

impl TryFrom<pb::ControlFrame> for ControlFrame {
    type Error = InvalidField;

    /// Field paths in errors are relative to the frame (`plugin_payload.kind`);
    /// callers add the request's field name with [`InvalidField::within`].
    fn try_from(frame: pb::ControlFrame) -> Result<Self, InvalidField> {
        use pb::control_frame::Frame as F;
        Ok(match required("frame", frame.frame)? {
            F::Goodbye(g) => ControlFrame::Goodbye {
                departing_id: node_id("goodbye.departing_id", &g.departing_id)?,
                reason: u8::try_from(g.reason).map_err(|_| {
                    InvalidField::new(
                        "goodbye.reason",
                        format!("a reason is 0..={MAX_REASON}, got {}", g.reason),
                    )
                })?,
            },
            F::Rekey(pb::Rekey {}) => ControlFrame::Rekey,
            F::Ping(p) => ControlFrame::Ping { nonce: p.nonce },
            F::Pong(p) => ControlFrame::Pong { nonce: p.nonce },
            F::PeerInfo(p) => {
                friendly_name("peer_info.friendly_name", &p.friendly_name)?;
                ControlFrame::PeerInfo {
                    x25519_pub: key("peer_info.x25519", &p.x25519)?,
                    friendly_name: p.friendly_name,
                }
            }
            F::PluginPayload(p) => {
                payload_kind("plugin_payload.kind", &p.kind)?;
                payload_body("plugin_payload.body", &p.body)?;
                ControlFrame::PluginPayload {
                    kind: p.kind,
                    body: p.body,
                }
            }
        })
    }
}

impl From<PeerInfoSource> for pb::PeerInfoSource {
    fn from(src: PeerInfoSource) -> Self {
        match src {
            PeerInfoSource::Direct => Self::Direct,
            PeerInfoSource::Routed => Self::Routed,
        }
    }
}

/// Checks a wire `PeerInfoSource` enum value.
pub fn peer_info_source(field: &str, value: i32) -> Result<PeerInfoSource, InvalidField> {
    match pb::PeerInfoSource::try_from(value) {
        Ok(pb::PeerInfoSource::Direct) => Ok(PeerInfoSource::Direct),
        Ok(pb::PeerInfoSource::Routed) => Ok(PeerInfoSource::Routed),
        Ok(pb::PeerInfoSource::Unspecified) => Err(InvalidField::new(
            field,
            "must be PEER_INFO_SOURCE_DIRECT or PEER_INFO_SOURCE_ROUTED, got UNSPECIFIED",
        )),
        Err(_) => Err(InvalidField::new(
            field,
            format!("unknown PeerInfoSource value {value}"),
        )),
    }
}

/// One change seen on a `PeerDirectory.Watch` stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A keystore change, as `pim_plugin` publishes it.
    Peer(PeerDirectoryEvent),
    /// The stream skipped this many changes because the watcher was slow.
    Lagged {
        /// Number of skipped changes.
        missed: u64,
    },
}

impl From<&PeerDirectoryEvent> for pb::WatchResponse {
    fn from(ev: &PeerDirectoryEvent) -> Self {
        use pb::watch_response::Event as E;
        let event = match ev {
            PeerDirectoryEvent::Seen {
                node_id,
                x25519_pub,
                name,
                via,
            } => E::Seen(pb::PeerSeen {
                node: Bytes::copy_from_slice(node_id.as_bytes()),
                x25519: Bytes::copy_from_slice(x25519_pub),
                name: name.clone(),
                via: pb::PeerInfoSource::from(*via) as i32,
            }),
            PeerDirectoryEvent::Forgotten { node_id } => E::Forgotten(pb::PeerForgottenNotice {
                node: Bytes::copy_from_slice(node_id.as_bytes()),
            }),
        };
        pb::WatchResponse { event: Some(event) }
    }
}

impl TryFrom<pb::WatchResponse> for WatchEvent {
    type Error = InvalidField;

    fn try_from(msg: pb::WatchResponse) -> Result<Self, InvalidField> {
        use pb::watch_response::Event as E;
        Ok(match required("event", msg.event)? {
            E::Seen(s) => {
                friendly_name("seen.name", &s.name)?;
                WatchEvent::Peer(PeerDirectoryEvent::Seen {
                    node_id: node_id("seen.node", &s.node)?,
                    x25519_pub: key("seen.x25519", &s.x25519)?,
                    name: s.name,
                    via: peer_info_source("seen.via", s.via)?,
                })
            }
            E::Forgotten(f) => WatchEvent::Peer(PeerDirectoryEvent::Forgotten {
                node_id: node_id("forgotten.node", &f.node)?,
            }),
            E::Lagged(l) => WatchEvent::Lagged { missed: l.missed },
        })
    }
}

/// Checks a wire `Capability` enum value.
pub fn capability(field: &str, value: i32) -> Result<pb::Capability, InvalidField> {
    match pb::Capability::try_from(value) {
        Ok(pb::Capability::Unspecified) => Err(InvalidField::new(
            field,
            "CAPABILITY_UNSPECIFIED is never granted",
        )),
        Ok(cap) => Ok(cap),
        Err(_) => Err(InvalidField::new(
            field,
            format!("unknown Capability value {value}"),
        )),
    }
}

#[cfg(test)]
mod tests;
