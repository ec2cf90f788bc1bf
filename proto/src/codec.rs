//! The gRPC codecs of the `pim.plugin.v1` services. [`Codec`], which the
//! generated servers and clients use, is prost's, except that a request
//! that does not decode (malformed protobuf, invalid UTF-8 in a string
//! field) is the caller's bad input, `INVALID_ARGUMENT`, not `INTERNAL`
//! (which docs/PROTOCOL.md reserves for host bugs); a reply that does not
//! decode, on the client side, stays `INTERNAL`: the host's fault, not a
//! refusal of the client. [`EventBatchCodec`] is a client's codec for the
//! Events call that decodes nothing: each message's bytes become an
//! [`EventBatch`](crate::batch::EventBatch), whose events are checked as
//! they are read. [`EventsServerCodec`] is the host's codec for the same
//! call, writing each [`OutgoingBatch`](crate::batch::OutgoingBatch)
//! straight from its events. Both are mounted at [`EVENTS_PATH`], beside
//! the generated client and server, which use prost's messages.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// Prost's codec, with undecodable requests as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(PhantomData)
    }
}

/// Decodes `U`; a request that does not decode is `INVALID_ARGUMENT`, a
/// reply `INTERNAL`.
#[derive(Debug, Clone)]
pub struct InvalidArgumentDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = std::any::type_name::<U>()
                .rsplit("::")
                .next()
                .unwrap_or("message");
            let message = format!("the message is not a valid {name}: {e}");
            // Servers decode `*Request`s (buf lint keeps the names so).
            if name.ends_with("Request") {
                Status::invalid_argument(message)
            } else {
                Status::internal(message)
            }
        })
    }
}

/// The path of the `PluginSession.Events` call: where a client using
/// [`EventBatchCodec`] calls it, and where a server using
/// [`EventsServerCodec`] serves it.
pub const EVENTS_PATH: &str = "/pim.plugin.v1.PluginSession/Events";

/// The client codec of the Events call that keeps each `EventsResponse` as
/// it came off the wire, an [`EventBatch`](crate::batch::EventBatch) read
/// one event at a time; requests are encoded by prost.
#[derive(Debug, Clone, Default)]
pub struct EventBatchCodec;

impl tonic::codec::Codec for EventBatchCodec {
    type Encode = crate::pb::EventsRequest;
    type Decode = crate::batch::EventBatch;
    type Encoder = ProstEncoder<crate::pb::EventsRequest>;
    type Decoder = EventBatchCodec;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<crate::pb::EventsRequest, crate::pb::EventsResponse>::raw_encoder(
            BufferSettings::default(),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        EventBatchCodec
    }
}

impl Decoder for EventBatchCodec {
    type Item = crate::batch::EventBatch;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf;
        // The message's bytes, not copied: split off tonic's read buffer.
        let len = buf.remaining();
        Ok(Some(crate::batch::EventBatch::new(buf.copy_to_bytes(len))))
    }
}

/// The server codec of the Events call: each
/// [`OutgoingBatch`](crate::batch::OutgoingBatch) is written straight from
/// its events (the bytes prost would write for its message); requests are
/// decoded by prost, an undecodable one `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct EventsServerCodec;

impl tonic::codec::Codec for EventsServerCodec {
    type Encode = crate::batch::OutgoingBatch;
    type Decode = crate::pb::EventsRequest;
    type Encoder = EventsServerCodec;
    type Decoder = InvalidArgumentDecoder<crate::pb::EventsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        EventsServerCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(PhantomData)
    }
}

impl Encoder for EventsServerCodec {
    type Item = crate::batch::OutgoingBatch;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_events_path_is_the_generated_servers() {
        use crate::pb::plugin_session_server::SERVICE_NAME;
        assert_eq!(super::EVENTS_PATH, format!("/{SERVICE_NAME}/Events"));
    }
}
