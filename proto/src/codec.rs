//! The gRPC codec of every `pim.plugin.v1` service: prost's, except that a
//! request that does not decode (malformed protobuf, invalid UTF-8 in a
//! string field) is the caller's bad input, `INVALID_ARGUMENT`, not
//! `INTERNAL` (which docs/PROTOCOL.md reserves for host bugs). A reply that
//! does not decode, on the client side, stays `INTERNAL`: the host's fault,
//! not a refusal of the client.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
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
