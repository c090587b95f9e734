//! The gRPC codec of every service: prost's, except that a message that does not decode is
//! INVALID_ARGUMENT with the message type named, not INTERNAL. A truncated or mistyped
//! request is the sender's fault; INTERNAL would tell clients and operators the server broke
//! (the chaos runner's bad-input probes found prost's INTERNAL on every port).
//!
//! The decoder does not know which side it runs on, so a reply from a peer that does not
//! decode is INVALID_ARGUMENT on the client too; the message says what failed to decode.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Generated services use this (`codec_path` in build.rs).
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decode error (INTERNAL) as INVALID_ARGUMENT naming the message type; any other
/// status as it is.
fn invalid<U>(s: Status) -> Status {
    if s.code() == Code::Internal {
        let ty = std::any::type_name::<U>()
            .rsplit("::")
            .next()
            .unwrap_or("message");
        Status::invalid_argument(format!("not a valid {ty}: {}", s.message()))
    } else {
        s
    }
}

/// prost's decoder with decode errors turned into INVALID_ARGUMENT.
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(invalid::<U>)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn a_decode_error_is_invalid_argument_naming_the_type_and_others_pass_through() {
        // What prost's decoder answers for a field cut short.
        let e = invalid::<pb::KvPutRequest>(Status::internal(
            "failed to decode Protobuf message: KvPutRequest.namespace: buffer underflow",
        ));
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("not a valid KvPutRequest: "),
            "{e:?}"
        );
        assert!(e.message().contains("buffer underflow"), "{e:?}");
        let e = invalid::<pb::KvPutRequest>(Status::resource_exhausted("too big"));
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
}
