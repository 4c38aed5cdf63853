//! Compiles `proto/xray` with protox, a protobuf compiler in pure Rust (a fresh machine's
//! `cargo build` needs no `protoc`), and tonic-prost-build: the messages and the server traits.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "xray/app/proxyman/command/command.proto",
        "xray/app/stats/command/command.proto",
        "xray/proxy/vless/account.proto",
        "xray/proxy/vmess/account.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
