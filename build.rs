//! Compiles the protobuf definitions with protox (pure Rust, no system `protoc`).
//!
//! Two sets are generated:
//! - `proto/`: streamhub's own wire definitions (the contract plus additions),
//!   used by the library, with servers and clients, and an encoded descriptor
//!   set for server reflection.
//! - `contract/`: verbatim copies of the original contract, generated as
//!   clients only into `$OUT_DIR/contract/`, so the tests can prove that a
//!   client built from the unchanged contract still works against the server.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: [&str; 4] = [
    "proto/telemetry.proto",
    "proto/fileupload.proto",
    "proto/chat.proto",
    "proto/server.proto",
];

const CONTRACT: [&str; 3] = [
    "contract/telemetry.proto",
    "contract/fileupload.proto",
    "contract/chat.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for path in PROTOS.iter().chain(CONTRACT.iter()) {
        println!("cargo:rerun-if-changed={path}");
    }
    // The dashboard's built files are embedded (src/web/assets.rs).
    println!("cargo:rerun-if-changed=web/dist");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(
        out_dir.join("streamhub_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    // Telemetry uses a codec with small per-call buffers (src/codec.rs):
    // tonic's 8 KiB per call dominate the memory of idle Subscribe streams.
    let (telemetry, others): (Vec<_>, Vec<_>) = fds
        .file
        .iter()
        .cloned()
        .partition(|f| f.package() == "telemetry");
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(prost_types::FileDescriptorSet { file: telemetry })?;
    tonic_prost_build::configure().compile_fds(prost_types::FileDescriptorSet { file: others })?;

    let contract_dir = out_dir.join("contract");
    fs::create_dir_all(&contract_dir)?;
    let contract = protox::compile(CONTRACT, ["contract"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&contract_dir)
        .compile_fds(contract)?;
    Ok(())
}
