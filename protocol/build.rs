//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building tern never needs
//! a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["tern/v1/tern.proto"];
    let includes = ["proto"];
    let descriptors = protox::compile(files, includes)?;
    let mut config = prost_build::Config::new();
    // Every generated type gets a proptest `Arbitrary` in unit tests, so round-trip tests cover
    // every frame type without hand-written strategies.
    config.type_attribute(
        ".",
        "#[cfg_attr(test, derive(::proptest_derive::Arbitrary))]",
    );
    config.compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
