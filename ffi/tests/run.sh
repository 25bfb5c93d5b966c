#!/usr/bin/env bash
# Runs the bindings' test suites in Kotlin (JVM) and Python against real tern-server
# processes. Installs the Kotlin compiler (npm `kotlin-compiler`) and JNA (Debian
# `libjna-java`) when missing. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
target_dir="${CARGO_TARGET_DIR:-target}"
export TERN_SERVER_BIN="$(realpath -m "$target_dir/debug/tern-server")"
bindings="$(realpath -m "$target_dir/bindings")"

echo "== generating bindings"
# The same selection as scripts/test.sh's build step, so that after it this is a no-op: a
# build of just tern-ffi would unify features differently and recompile shared crates.
cargo build -q --workspace --all-targets --locked
ffi/scripts/generate-bindings.sh --no-build "$bindings"

echo "== README snippets match the Kotlin test"
python3 ffi/tests/check_snippets.py ffi/README.md ffi/tests/kotlin/BindingsTest.kts

echo "== Python bindings"
TERN_PY_BINDINGS="$bindings/python" python3 ffi/tests/python/test_bindings.py

echo "== Kotlin bindings"
tools="${TERN_TOOLS_DIR:-$HOME/.cache/tern-tools}"
kotlin_home="$tools/node_modules/kotlin-compiler"
if [[ ! -x "$kotlin_home/bin/kotlinc" ]]; then
    mkdir -p "$tools"
    npm install --no-save --no-audit --no-fund --prefix "$tools" kotlin-compiler@2 >/dev/null
fi
jna=/usr/share/java/jna.jar
if [[ ! -f "$jna" ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjna-java >/dev/null
fi
if ! command -v java >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null
fi
kotlinc="$kotlin_home/bin/kotlinc"
coroutines="$kotlin_home/lib/kotlinx-coroutines-core-jvm.jar"
jar="$bindings/kotlin/tern-bindings.jar"
"$kotlinc" -nowarn "$bindings/kotlin/dev/tern/tern_ffi.kt" \
    -classpath "$jna:$coroutines" -d "$jar" 2>&1 | grep -v "^warning: unable to find kotlin-stdlib.jar" || true
[[ -f "$jar" ]] || { echo "compiling the Kotlin bindings failed"; exit 1; }
"$kotlinc" -nowarn -classpath "$jna:$coroutines:$jar" -J-Djna.library.path="$bindings/lib" \
    -script ffi/tests/kotlin/BindingsTest.kts
