#!/usr/bin/env bash
# Runs every check tern has: format, lints, Rust tests, and interop tests in other languages.
# Works on a fresh machine: it installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "disk"
# A CI build once ran out of disk; print what there is so a failure says why.
df -h . || true
if [[ -n "${CI:-}" ]]; then
    # Incremental state is ~2 GB that a one-off build never reuses.
    export CARGO_INCREMENTAL=0
fi

step "dependencies"
if ! python3 -c 'import aioquic' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check aioquic
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc"
# Broken intra-doc links (to private items, or moved ones) fail here rather than rot.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "build"
# Every target, tests included: one feature selection (dev-dependencies unified), so the test
# step and the bindings step below reuse these artifacts instead of recompiling shared crates.
cargo build --workspace --all-targets --locked

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    cargo test --workspace --doc --locked
else
    cargo test --workspace --locked --no-fail-fast
fi

step "QUIC interop (aioquic)"
python3 tests/interop/quic_interop.py "${CARGO_TARGET_DIR:-target}/debug/tern-server"

step "mobile bindings: Kotlin (JVM) and Python suites against a real server"
ffi/tests/run.sh
