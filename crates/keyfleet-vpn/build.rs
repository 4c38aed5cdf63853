//! Compiles the few protobuf messages of the Xray/V2Ray gRPC API (`proto/xray`) with protox, a
//! protobuf compiler in pure Rust: a fresh machine's `cargo build` needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    println!("cargo:rerun-if-changed={root}");
    let files = [
        "xray/app/proxyman/command/command.proto",
        "xray/app/stats/command/command.proto",
        "xray/proxy/vless/account.proto",
        "xray/proxy/vmess/account.proto",
    ];
    let descriptors = protox::compile(files, [root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
