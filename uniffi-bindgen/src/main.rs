//! `uniffi-bindgen` at exactly the UniFFI version `tern-ffi` is built with: generated code and
//! scaffolding must come from the same version. See `ffi/README.md`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
