//! Compiles `pim/plugin/v1/*.proto` with protox (no system `protoc`) into
//! prost messages, tonic services and the encoded descriptor set that
//! server reflection serves.

use std::path::PathBuf;

use prost::Message as _;

const FILES: &[&str] = &[
    "pim/plugin/v1/session.proto",
    "pim/plugin/v1/peer_directory.proto",
    "pim/plugin/v1/control_sender.proto",
    "pim/plugin/v1/identity_secrets.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(FILES, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("pim_plugin_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".pim.plugin.v1")
        .codec_path("crate::codec::Codec")
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
