//! The protobuf codec of the telemetry service: prost, with small per-call
//! buffers.
//!
//! tonic allocates an encode buffer (and a decode buffer) of 8 KiB for every
//! call, eagerly, and grows it in steps of that size. A long-lived telemetry
//! stream holds its buffers for its whole life while it carries ~60-byte
//! messages, so at 100,000 streams the default costs far more memory than
//! the streams themselves (see BENCHMARKS.md, fan-out). Telemetry messages
//! are small; 1 KiB buffers fit them and still grow for a large
//! ListServices answer. (Subscribe's responses bypass the codec: see
//! `telemetry::route`; its request is decoded with it.) Upload and chat keep
//! tonic's default codec.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes allocated per call for encoding and for decoding.
pub const BUFFER_SIZE: usize = 1024;

/// Encoded bytes gathered before a streaming response yields to the
/// transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec whose calls start with [`BUFFER_SIZE`] buffers.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
