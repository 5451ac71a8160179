#!/bin/bash
# A/B of two padlockd builds with one client, runs alternating:
#   bash docs/bench-ab.sh OLD_PADLOCKD NEW_PADLOCKD [ROUNDS] [extra bench flags, e.g. --seconds 5]
#   bash docs/bench-ab.sh OLD NEW 3 --kind redis --handoffs 300   # the redis kind
# (bench defaults: 3 s per phase, 64 clients; the memory phase is skipped)
# Each run gets a fresh lock directory; the client is ./target/release/padlock
# (or $PADLOCK_BENCH_CLIENT). Prints the rows of each run and the ratios to a
# raw Redis lock (Redis at 127.0.0.1:6379).
# PIN=0 runs padlockd and the client on core 0 only: nothing then waits for
# a sleeping CPU, so a cycle costs the CPU work of both sides, with far
# less noise (see docs/benchmarks.md, "everything on one core"). Compare
# the builds' rows then, not the ratios: the machine's Redis is not pinned.
# OLD_FLAGS and NEW_FLAGS add bench flags to one side only: the same
# padlockd twice with NEW_FLAGS=--grpc-session compares the transports.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
client=${PADLOCK_BENCH_CLIENT:-./target/release/padlock}
pin=()
[ -n "${PIN:-}" ] && pin=(taskset -c "$PIN")
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for round in $(seq "$rounds"); do
  for v in old new; do
    bin=$old flags=${OLD_FLAGS:-}
    [ "$v" = new ] && bin=$new flags=${NEW_FLAGS:-}
    rm -rf "$dir/locks" && mkdir -p "$dir/locks"
    "${pin[@]}" "$bin" --listen 127.0.0.1:7421 --lock-dir "$dir/locks" \
        --redis-url redis://127.0.0.1:6379 >"$dir/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do curl -sf http://127.0.0.1:7421/healthz >/dev/null && break; sleep 0.1; done
    echo "=== round $round $v ($bin $flags)"
    # shellcheck disable=SC2086 # flags are words
    "${pin[@]}" "$client" --server 127.0.0.1:7421 bench --held 0 \
        --redis-url redis://127.0.0.1:6379 $flags "$@" 2>&1 |
      grep -E "^\| (floor|acquire|handoff|one conn|64 clients)|against"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    pid=
  done
done
