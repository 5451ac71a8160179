#!/bin/bash
# CPU per lock cycle, server and client apart, at 64 clients:
#   bash docs/bench-cpu.sh PADLOCKD [extra bench flags, e.g. --grpc-session]
# Starts PADLOCKD on a fresh lock directory and runs `padlock bench` (6 s
# phases) against it and the machine's Redis (127.0.0.1:6379), sampling
# utime and stime of padlockd, of the bench client and of redis-server
# every 0.25 s. Prints, for the 3 s of the 64-client padlock phase and the
# 3 s of the 64-connection raw Redis phase where each server was busiest:
# ops/s, the server's and the client's CPU per cycle (µs; in user space +
# in the kernel), and how much of a core each used. The client is ./target/release/padlock (or
# $PADLOCK_BENCH_CLIENT).
set -euo pipefail
server=$1
shift
client=${PADLOCK_BENCH_CLIENT:-./target/release/padlock}
dir=$(mktemp -d)
spid=
trap '[ -n "$spid" ] && kill "$spid" 2>/dev/null; rm -rf "$dir"' EXIT
mkdir -p "$dir/locks"
"$server" --listen 127.0.0.1:7422 --lock-dir "$dir/locks" >"$dir/server.log" 2>&1 &
spid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:7422/healthz >/dev/null && break; sleep 0.1; done
rpid=$(pgrep -x redis-server | head -1)
"$client" --server 127.0.0.1:7422 bench --held 0 --handoffs 0 --seconds 6 \
    --redis-url redis://127.0.0.1:6379 "$@" >"$dir/bench.out" 2>&1 &
cpid=$!
ticks() { awk '{print $14 ":" $15}' "/proc/$1/stat" 2>/dev/null || echo -; }
while kill -0 "$cpid" 2>/dev/null; do
  echo "$(date +%s.%N) $(ticks "$spid") $(ticks "$rpid") $(ticks "$cpid")" >>"$dir/samples"
  sleep 0.25
done
wait "$cpid"
grep -E "^\| (acquire|64 clients)|^padlock bench" "$dir/bench.out"
python3 - "$dir/samples" "$dir/bench.out" <<'PY'
import re, sys
hz = 100
rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) == 4 and '-' not in parts[1:]:
        rows.append([float(parts[0])] + [tuple(map(int, p.split(':'))) for p in parts[1:]])
out = open(sys.argv[2]).read()
def ops(label):
    m = re.search(r'^\| ' + re.escape(label) + r'.*\| ([0-9.]+) \|$', out, re.M)
    return float(m.group(1))
def busiest(col):
    n = 12  # 3 s of 0.25 s samples
    i = max(range(len(rows) - n), key=lambda i: sum(rows[i + n][col]) - sum(rows[i][col]))
    return rows[i], rows[i + n]
for name, col, label in [('padlockd', 1, 'acquire+release, 64 clients on distinct names'),
                         ('redis-server', 2, '64 clients on distinct keys')]:
    a, b = busiest(col)
    t = b[0] - a[0]
    rate = ops(label)
    def per_cycle(c):
        user, kernel = ((b[c][k] - a[c][k]) / hz / t * 1e6 / rate for k in (0, 1))
        share = (user + kernel) * rate / 1e6 * 100
        return f'{user + kernel:.1f} µs/cycle ({user:.1f} user + {kernel:.1f} kernel; {share:.0f} % of a core)'
    print(f'{name}: {rate:.0f} ops/s; server {per_cycle(col)}, client {per_cycle(3)}')
PY
