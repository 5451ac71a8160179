#!/usr/bin/env bash
# Runs padlock's whole test suite on a fresh machine: installs what the
# tests need when it is missing (a Python venv with portalocker 4.4.2,
# grpcio and pytest, flock(1), redis-server, openssl, Chromium and
# chromedriver), builds the binaries, runs `cargo test --workspace`, then
# installs the Python client from sdk/python into the venv and runs its
# pytest suite against the same binaries.
#
# Opt-outs (for a machine without them; refused under CI=true):
#   PADLOCK_SKIP_PORTALOCKER=1   skip the portalocker interop tests
#   PADLOCK_SKIP_BROWSER=1       skip the dashboard tests in headless Chromium
#   PADLOCK_SKIP_REDIS=1         skip the tests that need redis-server
# Every skipped test is listed as SKIPPED at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

opted_out=$(env | grep -E '^PADLOCK_SKIP_(PORTALOCKER|BROWSER|REDIS)=1$' || true)
if [ -n "$opted_out" ] && [ "${CI:-}" = true ]; then
    echo "tests/run.sh: opt-outs are refused under CI=true (CI runs every test):" $opted_out >&2
    exit 1
fi

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: please install: $*" >&2
        return 1
    fi
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

command -v flock >/dev/null || apt_install util-linux
command -v curl >/dev/null || apt_install curl

if [ "${PADLOCK_SKIP_BROWSER:-}" != 1 ]; then
    { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } ||
        apt_install chromium chromium-driver
fi

if [ "${PADLOCK_SKIP_REDIS:-}" != 1 ]; then
    # The redis tests start their own redis-server on a free port.
    command -v redis-server >/dev/null || apt_install redis-server
fi

command -v openssl >/dev/null || apt_install openssl

# One venv for portalocker (the interop tests) and the Python client's tests.
want='import portalocker, redis, grpc, pytest; assert portalocker.__version__ == "4.4.2"'
if ! { [ -x .venv/bin/python ] && .venv/bin/python -c "$want" 2>/dev/null; }; then
    command -v python3 >/dev/null || apt_install python3
    python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check \
        'portalocker[redis]==4.4.2' grpcio protobuf pytest
fi
if [ "${PADLOCK_SKIP_PORTALOCKER:-}" != 1 ]; then
    export PADLOCK_PYTHON="$PWD/.venv/bin/python"
fi

# The Python client, built as a user would (`pip install ./sdk/python`:
# its gRPC stubs are generated from proto/ while it builds); the Rust
# tests use it too (tests/tests/python_client.rs).
.venv/bin/pip install --quiet --disable-pip-version-check ./sdk/python

cargo build --workspace --bins
skipped_log=target/debug/padlock-skipped.log
rm -f "$skipped_log"
# Every test binary runs, so one failure does not hide the others.
cargo test --workspace --no-fail-fast "$@"

PADLOCK_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest -q -rs sdk/python/tests

if [ -s "$skipped_log" ]; then
    echo
    echo "tests/run.sh: $(wc -l <"$skipped_log") Rust tests were SKIPPED (opted out), so they checked nothing:"
    sort "$skipped_log"
fi
