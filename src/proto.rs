//! Generated protobuf and gRPC code.
//!
//! Only the service layer (`*/service.rs`) and the CLI use these types; the
//! core modules (broker, storage, rules) speak domain types.

#![allow(missing_docs, clippy::all, clippy::pedantic)] // generated code

/// `telemetry` package: snapshot, subscribe, live feed.
pub mod telemetry {
    tonic::include_proto!("telemetry");
}

/// `fileupload` package: chunked uploads.
pub mod fileupload {
    tonic::include_proto!("fileupload");
}

/// `chat` package: bidirectional chat rooms.
pub mod chat {
    tonic::include_proto!("chat");
}

/// The encoded `FileDescriptorSet` of every streamhub proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/streamhub_descriptor.bin"));

/// `streamhub` package: the server's own service (identity, server info).
pub mod streamhub {
    tonic::include_proto!("streamhub");
}
