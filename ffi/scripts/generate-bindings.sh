#!/usr/bin/env bash
# Builds the tern-ffi library and generates its Kotlin, Swift and Python bindings.
#
#   ffi/scripts/generate-bindings.sh [--release] [--no-build] [OUT_DIR]
#
# OUT_DIR defaults to target/bindings. It receives kotlin/dev/tern/tern_ffi.kt,
# swift/{TernFFI.swift,TernFFIFFI.h,TernFFIFFI.modulemap}, python/tern_ffi.py, and a copy of
# the host library (libtern_ffi.so / .dylib) in lib/ (for JNA) and in python/ (for ctypes).
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=debug
cargo_profile=()
build=1
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --release) profile=release; cargo_profile=(--release) ;;
        # The caller built the library and uniffi-bindgen already (scripts/test.sh).
        --no-build) build=0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
target_dir="${CARGO_TARGET_DIR:-target}"
out="${1:-$target_dir/bindings}"

if [[ $build == 1 ]]; then
    cargo build -q "${cargo_profile[@]}" -p tern-ffi -p uniffi-bindgen
fi
case "$(uname -s)" in
    Darwin) lib="$target_dir/$profile/libtern_ffi.dylib" ;;
    *) lib="$target_dir/$profile/libtern_ffi.so" ;;
esac

rm -rf "$out"
mkdir -p "$out"
# Library mode: the interface is read from the metadata compiled into the library itself.
"$target_dir/$profile/uniffi-bindgen" generate --no-format \
    --language kotlin --language swift --language python \
    --out-dir "$out" "$lib"
mkdir -p "$out/kotlin" "$out/swift" "$out/python" "$out/lib"
mv "$out/dev" "$out/kotlin/"
mv "$out"/*.swift "$out"/*.h "$out"/*.modulemap "$out/swift/"
mv "$out"/*.py "$out/python/"
cp "$lib" "$out/lib/"
# ctypes loads the library from beside the module.
cp "$lib" "$out/python/"
echo "bindings in $out"
