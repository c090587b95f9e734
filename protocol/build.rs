//! Compiles `proto/` with the pure-Rust `protox` compiler (no system protoc). With the `grpc`
//! feature off only the prost messages are generated, so the crate builds without tokio.
use std::io::Result;

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let fds = protox::compile(
        [
            "rayctl/v1/cluster.proto",
            "rayctl/v1/object.proto",
            "rayctl/v1/worker.proto",
            "ray/rpc/gcs_compat.proto",
        ],
        ["proto"],
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    tonic_prost_build::configure()
        // A request that does not decode is INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::codec::StrictCodec")
        .build_client(grpc)
        .build_server(grpc)
        // Chunk payloads are `bytes::Bytes`: no copy between the HTTP/2 frame and the store.
        .bytes(".rayctl.v1.ObjectChunk.data")
        .bytes(".rayctl.v1.WriteObjectChunk.payload")
        .bytes(".rayctl.v1.BinaryChunk.data")
        .bytes(".rayctl.v1.Value.inline")
        .bytes(".rayctl.v1.ObjectStatus.inline")
        .compile_fds(fds)
}
