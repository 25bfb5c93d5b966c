#!/bin/bash
# The runs behind bench/README.md's results. Every scenario runs its relay-baseline first, in
# the same invocation. Usage: campaign.sh OUT_DIR [CONNECTION_RUNS] (after a release build of
# tern-bench and tern-server). About 20 minutes on the 2-core machine with one connections run.
set -u
B=$(cd "$(dirname "$0")/../.." && pwd)/target/release/tern-bench
R=${1:?usage: campaign.sh OUT_DIR [CONNECTION_RUNS]}
CONNECTION_RUNS=${2:-3}
mkdir -p "$R"
cd /tmp
run() { # run NAME ARGS...: one run, its JSON line appended to NAME.jsonl
    local name=$1; shift
    "$B" "$@" --json 2>>"$R/campaign.log" | tail -1 >> "$R/$name.jsonl"
}
for i in 1 2 3 4 5; do run direct direct --report "$R/report-direct"; done
for i in 1 2 3; do
    run direct-inflight16 direct --in-flight 16
    run direct-inflight32 direct --in-flight 32
done
for i in 1 2 3; do
    run hol hol --report "$R/report-hol"
    run group group --report "$R/report-group"
    run offline-sync offline-sync --report "$R/report-offline-sync"
    run migration migration --report "$R/report-migration"
    run soak soak --report "$R/report-soak"
done
for i in $(seq "$CONNECTION_RUNS"); do
    run connections connections --report "$R/report-connections"
done
echo done > "$R/campaign.done"
