#!/usr/bin/env python3
"""The checks behind deploy/check.sh (run that script, not this file).

Offline, for everything in deploy/:

1. flags: every padlockd flag, PADLOCK_* variable and config-file key used by
   the Dockerfile, the compose file and the Kubernetes manifests is one that
   `padlockd --help` lists (the CLI flags in examples: `padlock ... --help`).
2. Dockerfile: hadolint; the runtime stage's user, entrypoint, port, volume,
   health check; the release binaries need no library the runtime image lacks.
3. Kubernetes: every manifest against the Kubernetes JSON schema
   (kubernetes-validate --strict, two Kubernetes versions); the kustomize
   overlays (resources exist, no duplicates, cross references: selectors,
   ports, config, secrets, grace periods, security contexts), rendered with
   `kubectl kustomize` when kubectl is installed and validated again.
4. compose: the Compose Specification schema (check-jsonschema's vendored
   copy), then structure, images and builds, ports, volumes, commands.
5. runtime (root only): the release binaries run the way the image runs
   them, in network namespaces, under bubblewrap, as uid 65532 without
   capabilities, on a read-only root filesystem whose only writable path
   is the lock volume: the Dockerfile's ENTRYPOINT and HEALTHCHECK, the
   compose scale-out demo (a real redis-server), and each Kubernetes pod
   (its ConfigMap, Secret, volumes, probes and grace period).

Prints one line per check and ends with "deploy/check: N passed, N failed".
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
TOKENS_EXAMPLE = K8S / "tokens.example.yaml"

# Kubernetes versions the manifests must validate against (oldest, newest).
K8S_VERSIONS = ["1.30.0", "1.37.0"]

# Flags that were being added while deploy/ was written: when the binary does
# not list one yet, its use is reported as a note instead of a failure.
PENDING_FLAGS = {
    "--config", "--tls-cert", "--tls-key", "--tls-client-ca",
    "--client-token-file", "--log-format", "--max-connections",
}

# PADLOCK_* variables that are not flags' twins.
EXTRA_ENV = {"PADLOCK_LOG"}  # the log level filter (README, "Configuration")

# Libraries gcr.io/distroless/cc-debian12 ships (glibc, libgcc, libstdc++,
# OpenSSL 3): the release binaries may need no other.
DISTROLESS_CC_LIBS = {
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6",
    "libdl.so.2", "libpthread.so.0", "librt.so.1", "libgcc_s.so.1",
    "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3",
}


# --------------------------------------------------------------------------
# reporting

class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.notes: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}", flush=True)

    def fail(self, what: str) -> None:
        self.failed.append(what)
        print(f"  FAIL  {what}", flush=True)

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + why if why else ''}")
        return cond

    def group(self, label: str) -> "Group":
        return Group(self, label)

    def note(self, what: str) -> None:
        self.notes.append(what)
        print(f"  NOTE  {what}", flush=True)


class Group:
    """Checks that print one line when they all pass."""

    def __init__(self, report: Report, label: str) -> None:
        self.report, self.label = report, label

    def __enter__(self) -> "Group":
        self.start_passed, self.start_failed = self.report.passed, len(self.report.failed)
        self.saved_ok = self.report.ok
        self.report.ok = lambda what: setattr(self.report, "passed", self.report.passed + 1)
        return self

    def __exit__(self, *exc) -> None:
        self.report.ok = self.saved_ok
        n = self.report.passed - self.start_passed
        if len(self.report.failed) == self.start_failed:
            print(f"  ok    {self.label} ({n} checks)", flush=True)


R = Report()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def run_group(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """run(), in a process group of its own that is killed whole on timeout
    (a process that changed its uid outlives bwrap's --die-with-parent)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\n(killed after {timeout}s)")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------
# what the binaries accept

class Cli:
    """Flags and PADLOCK_* variables, read from --help."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        text = run([str(bin_dir / "padlockd"), "--help"]).stdout
        self.server_flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, re.M))
        self.server_env = set(re.findall(r"\[env: (PADLOCK_\w+)=", text))
        # flag -> env twin
        self.twin: dict[str, str] = {}
        for block in re.split(r"\n(?=\s+(?:-\w, )?--)", text):
            m = re.match(r"\s+(?:-\w, )?(--[a-z0-9-]+)", block)
            e = re.search(r"\[env: (PADLOCK_\w+)=", block)
            if m and e:
                self.twin[m.group(1)] = e.group(1)
        self.client_flags: dict[str, set[str]] = {}
        top = run([str(bin_dir / "padlock"), "--help"]).stdout
        subs = re.findall(r"^  ([a-z]+)\s{2,}", top.split("Commands:")[1].split("Options:")[0], re.M)
        self.client_flags[""] = set(re.findall(r"(--[a-z0-9-]+)", top.split("Options:")[1]))
        for sub in subs:
            if sub == "help":
                continue
            h = run([str(bin_dir / "padlock"), sub, "--help"]).stdout
            self.client_flags[sub] = set(re.findall(r"(--[a-z0-9-]+)", h)) | self.client_flags[""]
        self.client_env = set(re.findall(r"\[env: (PADLOCK_\w+)=", top))

    def server_flag(self, flag: str, where: str) -> None:
        if flag in self.server_flags:
            R.ok(f"{where}: padlockd accepts {flag}")
        elif flag in PENDING_FLAGS:
            R.note(f"{where}: {flag} is not in `padlockd --help` yet (being added): not checked")
        else:
            R.fail(f"{where}: padlockd has no flag {flag}")

    def server_var(self, name: str, where: str) -> None:
        flag = "--" + name.removeprefix("PADLOCK_").lower().replace("_", "-")
        if name in self.server_env or name in EXTRA_ENV:
            R.ok(f"{where}: padlockd reads {name}")
        elif flag in PENDING_FLAGS and flag not in self.server_flags:
            R.note(f"{where}: {name} ({flag}) is not in `padlockd --help` yet (being added): not checked")
        else:
            R.fail(f"{where}: padlockd has no variable {name}")

    def config_key(self, key: str, where: str) -> None:
        flag = "--" + key.replace("_", "-")
        if flag in self.server_flags and flag not in ("--config", "--help", "--version"):
            R.ok(f"{where}: config key `{key}` is padlockd's {flag}")
        elif flag in PENDING_FLAGS and "--config" not in self.server_flags:
            R.note(f"{where}: key `{key}` not checked (--config is being added)")
        elif flag in PENDING_FLAGS and flag not in self.server_flags:
            R.note(f"{where}: key `{key}` ({flag}) is not in `padlockd --help` yet (being added)")
        else:
            R.fail(f"{where}: config key `{key}` is no padlockd flag")


def split_flags(args: list[str]) -> dict[str, str | None]:
    """--flag value / --flag=value pairs (all padlockd flags take a value)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            else:
                out[a] = args[i + 1] if i + 1 < len(args) else None
                i += 1
        i += 1
    return out


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------
# Dockerfile

class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: list[dict] = []
        logical: list[str] = []
        cur = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not cur and (not line or line.startswith("#")):
                continue
            if cur and line.startswith("#"):
                continue
            if line.endswith("\\"):
                cur += line[:-1] + " "
                continue
            logical.append(cur + line)
            cur = ""
        for line in logical:
            instr, _, rest = line.partition(" ")
            instr = instr.upper()
            if instr == "FROM":
                parts = rest.split()
                self.stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 else None, "ins": []})
            elif self.stages:
                self.stages[-1]["ins"].append((instr, rest.strip()))
            else:
                self.stages.append({"from": None, "name": "(args)", "ins": [(instr, rest.strip())]})
        self.final = self.stages[-1]

    def last(self, instr: str, stage: dict | None = None) -> str | None:
        found = [r for i, r in (stage or self.final)["ins"] if i == instr]
        return found[-1] if found else None

    def all(self, instr: str, stage: dict | None = None) -> list[str]:
        return [r for i, r in (stage or self.final)["ins"] if i == instr]

    def json_form(self, instr: str) -> list[str] | None:
        text = self.last(instr)
        if text is None:
            return None
        try:
            v = json.loads(text)
        except json.JSONDecodeError:
            return None
        return v if isinstance(v, list) else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for text in self.all("ENV"):
            for tok in shlex.split(text):
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    env[k] = v
        return env

    def healthcheck(self) -> tuple[dict[str, str], list[str] | None]:
        text = self.last("HEALTHCHECK") or ""
        opts = dict(re.findall(r"--([a-z-]+)=(\S+)", text))
        m = re.search(r"\bCMD\s+(\[.*\])\s*$", text)
        cmd = json.loads(m.group(1)) if m else None
        return opts, cmd

    def user(self) -> tuple[int, int] | None:
        text = self.last("USER")
        m = re.fullmatch(r"(\d+)(?::(\d+))?", text or "")
        if not m:
            return None
        return int(m.group(1)), int(m.group(2) or m.group(1))


def check_dockerfile(cli: Cli, hadolint: str) -> Dockerfile:
    R.section(f"Dockerfile ({rel(DOCKERFILE)})")
    p = run([hadolint, "--no-color", str(DOCKERFILE)])
    R.check(p.returncode == 0 and not p.stdout.strip(), "hadolint finds nothing (Dockerfile best practices, offline)",
            (p.stdout + p.stderr).strip())
    df = Dockerfile(DOCKERFILE)
    build = [s for s in df.stages if s["name"] not in (None, "(args)") and s is not df.final]
    R.check(len(df.stages) >= 2 and bool(build), "multi-stage: a build stage and a runtime stage")
    runs = " ".join(" ".join(df.all("RUN", s)) for s in build)
    R.check("cargo build --release --bins --locked" in runs,
            "build stage runs `cargo build --release --bins --locked`")
    bfrom = build[0]["from"] if build else ""
    R.check("bookworm" in bfrom and "debian12" in df.final["from"],
            f"builder ({bfrom}) and runtime ({df.final['from']}) share Debian 12's glibc")
    R.check("distroless" in df.final["from"],
            f"runtime image {df.final['from']} is distroless: no shell, no package manager")
    for b in ("padlockd", "padlock"):
        R.check(re.search(rf"target/release/{b}\s+/out/bin/{b}\b", runs) is not None,
                f"build stage installs target/release/{b}")
    copies = df.all("COPY")
    R.check(any(re.search(r"--from=\S+\s+/out/bin/\s+/usr/local/bin/", c) for c in copies),
            "runtime stage copies both binaries to /usr/local/bin/")
    user = df.user()
    R.check(user is not None and user[0] != 0 and user[1] != 0, f"USER is a numeric non-root uid:gid ({df.last('USER')})")
    ep = df.json_form("ENTRYPOINT")
    cmd = df.json_form("CMD")
    R.check(ep is not None and ep[:1] == ["/usr/local/bin/padlockd"], "ENTRYPOINT is exec form, /usr/local/bin/padlockd")
    R.check(cmd is not None, "CMD is exec form (extra flags are appended to the ENTRYPOINT)")
    ep = ep or []
    flags = split_flags(ep[1:] + (cmd or []))
    for f in flags:
        cli.server_flag(f, "Dockerfile ENTRYPOINT")
    listen = flags.get("--listen") or ""
    R.check(listen.startswith("0.0.0.0:") or listen.startswith("[::]:"),
            f"ENTRYPOINT listens on all addresses ({listen})")
    port = listen.rsplit(":", 1)[-1]
    exposed = (df.last("EXPOSE") or "").split()
    R.check(port in [e.split("/")[0] for e in exposed], f"EXPOSE {port}")
    lock_dir = flags.get("--lock-dir")
    vols = json.loads(df.last("VOLUME") or "[]")
    R.check(lock_dir is not None and vols == [lock_dir], f"VOLUME is the --lock-dir ({lock_dir}) and nothing else")
    R.check(any(("--chown=%d:%d" % user) in c and lock_dir and lock_dir in c for c in copies) if user else False,
            "the lock directory is created owned by the runtime user")
    opts, hc = df.healthcheck()
    R.check(hc is not None, "HEALTHCHECK CMD is exec form, a JSON array (no shell needed)")
    R.check(hc == ["/usr/local/bin/padlock", "health"], f"HEALTHCHECK runs `padlock health` ({hc})")
    R.check(parse_duration(opts.get("timeout", "30s")) < parse_duration(opts.get("interval", "30s")),
            f"HEALTHCHECK timeout {opts.get('timeout')} < interval {opts.get('interval')}")
    env = df.env()
    srv = env.get("PADLOCK_SERVER", "")
    R.check(srv in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"),
            f"ENV PADLOCK_SERVER points the CLI at this container's port ({srv})")
    for k in env:
        if k.startswith("PADLOCK_") and k not in cli.client_env:
            R.fail(f"Dockerfile ENV {k} is a server setting: it would override --config files (env beats file)")
    R.check((df.last("STOPSIGNAL") or "SIGTERM") == "SIGTERM", "STOPSIGNAL SIGTERM (padlockd drains on SIGTERM)")
    # libraries
    for b in ("padlockd", "padlock"):
        out = run(["ldd", str(cli.bin_dir / b)]).stdout
        libs = {Path(l.split()[0]).name for l in out.splitlines() if l.strip()}
        extra = libs - DISTROLESS_CC_LIBS
        R.check(not extra, f"release {b} needs only libraries distroless/cc ships ({', '.join(sorted(libs))})",
                f"missing from the runtime image: {sorted(extra)}")
    dockerignore = ROOT / ".dockerignore"
    ign = dockerignore.read_text().split() if dockerignore.exists() else []
    R.check(all(x in ign for x in ("target/", ".git/")), ".dockerignore keeps target/ and .git/ out of the build context")
    return df


def entrypoint_of(df: Dockerfile) -> tuple[list[str], list[str]]:
    return df.json_form("ENTRYPOINT") or [], df.json_form("CMD") or []


# --------------------------------------------------------------------------
# Kubernetes

def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def workspace_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def validate_schema(validator: str, files: list[Path], label: str) -> None:
    for version in K8S_VERSIONS:
        p = run([validator, "--strict", "-k", version] + [str(f) for f in files])
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        bad = [l for l in lines if not l.startswith("INFO")]
        passed = [l for l in lines if l.startswith("INFO") and " passed " in l]
        if p.returncode == 0 and not bad and passed:
            R.ok(f"{label}: {len(passed)} objects valid against Kubernetes {version} (strict)")
        else:
            for l in bad or lines:
                R.fail(f"{label}, Kubernetes {version}: {l}")


class Overlay:
    """The objects a kustomization produces, computed without kustomize."""

    def __init__(self, path: Path) -> None:
        self.dir = path.parent
        self.objects: list[tuple[Path, dict]] = []
        self.images: list[dict] = []
        self.errors: list[str] = []
        self._load(path, set())

    def _load(self, path: Path, seen: set) -> None:
        if path in seen:
            self.errors.append(f"{rel(path)} includes itself")
            return
        seen = seen | {path}
        k = yaml.safe_load(path.read_text())
        allowed = {"apiVersion", "kind", "resources", "images"}  # what this reading applies
        for key in k:
            if key not in allowed:
                self.errors.append(f"{rel(path)}: key `{key}` is not checked by deploy/check.py; extend it")
        if k.get("kind") != "Kustomization" or k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
            self.errors.append(f"{rel(path)}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
        for entry in k.get("resources", []):
            target = (path.parent / entry).resolve()
            if target.is_dir():
                kf = target / "kustomization.yaml"
                if kf.exists():
                    self._load(kf, seen)
                else:
                    self.errors.append(f"{rel(path)}: {entry} has no kustomization.yaml")
            elif target.is_file():
                for d in load_docs(target):
                    self.objects.append((target, d))
            else:
                self.errors.append(f"{rel(path)}: resource {entry} does not exist")
        self.images += k.get("images", [])

    def find(self, kind: str, name: str) -> dict | None:
        for _, o in self.objects:
            if o.get("kind") == kind and o["metadata"]["name"] == name:
                return o
        return None

    def of_kind(self, *kinds: str) -> list[dict]:
        return [o for _, o in self.objects if o.get("kind") in kinds]


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def padlockd_container(w: dict) -> dict | None:
    for c in w["spec"]["template"]["spec"]["containers"]:
        if c["image"].split(":")[0].rsplit("/", 1)[-1] == "padlock":
            return c
    return None


def config_of(ov: Overlay, w: dict, container: dict) -> tuple[dict, str] | None:
    """The TOML config a padlockd container is given with --config."""
    flags = split_flags(container.get("args", []))
    path = flags.get("--config")
    if not path:
        return None
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"])
            if "configMap" in vol:
                cm = ov.find("ConfigMap", vol["configMap"]["name"])
                if cm and key in cm.get("data", {}):
                    return tomllib.loads(cm["data"][key]), f"ConfigMap {cm['metadata']['name']}/{key}"
    return None


def check_kubernetes(cli: Cli, df: Dockerfile, validator: str) -> None:
    R.section("Kubernetes manifests: schema (kubernetes-validate --strict, offline)")
    files = manifest_files()
    R.check(bool(files), f"{len(files)} manifest files under {rel(K8S)}")
    for f in files:
        for d in load_docs(f):
            R.check(d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"),
                    f"{rel(f)}: {d.get('kind')}/{d.get('metadata', {}).get('name')} has apiVersion, kind and name")
    validate_schema(validator, files, "plain manifests")

    R.section("Kubernetes: kustomize overlays and cross references")
    version = workspace_version()
    ep, cmd = entrypoint_of(df)
    ep_flags = split_flags(ep[1:] + cmd)
    image_port = int((ep_flags.get("--listen") or ":0").rsplit(":", 1)[-1])
    image_lock_dir = ep_flags.get("--lock-dir")
    image_user = df.user()
    tokens_secret = load_docs(TOKENS_EXAMPLE)[0]
    overlays = [p for p in kustomization_files() if p.parent.parent.name == "overlays"]
    R.check(len(overlays) >= 1, f"overlays: {', '.join(rel(p.parent) for p in overlays)}")
    included: set[Path] = set()
    seen: set[tuple[str, str]] = set()
    kubectl = shutil.which("kubectl")
    for kpath in overlays:
        ov = Overlay(kpath)
        name = rel(ov.dir)
        included |= {p for p, _ in ov.objects}
        ids = [(o["kind"], o["metadata"]["name"]) for _, o in ov.objects]
        workloads = ov.of_kind("Deployment", "StatefulSet")
        padlockds = [w for w in workloads if padlockd_container(w)]
        print(f"  -- {name}: {', '.join(f'{k}/{n}' for k, n in ids)}")
        with R.group(f"{name}: structure and cross references"):
            for e in ov.errors:
                R.fail(e)
            dups = {i for i in ids if ids.count(i) > 1}
            R.check(not dups, f"{name}: {len(ids)} objects, no duplicates", f"duplicates {dups}")
            R.check(all(o["metadata"].get("namespace") == "padlock" for _, o in ov.objects if o["kind"] != "Namespace"),
                    f"{name}: every namespaced object is in namespace padlock")
            R.check(ov.find("Namespace", "padlock") is not None, f"{name}: creates the padlock namespace")
            R.check(not ov.of_kind("Secret"), f"{name}: ships no Secret (tokens are created by the operator)")
            R.check(bool(ov.images), f"{name}: sets the image (kustomize `images:`)")
            for img in ov.images:
                R.check(img.get("name") == "padlock" and str(img.get("newTag")) == version,
                        f"{name}: image padlock tagged {img.get('newTag')} = workspace version {version}")
            R.check(bool(padlockds), f"{name}: has padlockd workloads")
            for w in workloads:
                for v in w["spec"]["template"]["spec"].get("volumes", []):
                    if "configMap" in v:
                        R.check(ov.find("ConfigMap", v["configMap"]["name"]) is not None,
                                f"{name}: {w['metadata']['name']}'s ConfigMap {v['configMap']['name']} is in the overlay")
            check_services(ov, name, workloads)
            check_redis_refs(ov, name, workloads)
        for w in workloads:
            if (w["kind"], w["metadata"]["name"]) in seen:
                continue
            seen.add((w["kind"], w["metadata"]["name"]))
            check_workload(w, tokens_secret)
            if padlockd_container(w):
                check_padlockd_workload(cli, ov, w, image_port, image_lock_dir, image_user, tokens_secret, version)
        # kustomize itself, when kubectl (which embeds it) is installed
        if kubectl:
            p = run([kubectl, "kustomize", str(ov.dir)])
            if not R.check(p.returncode == 0, f"{name}: `kubectl kustomize` renders it", p.stderr.strip()):
                continue
            rendered = [d for d in yaml.safe_load_all(p.stdout) if d]
            rids = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
            R.check(rids == sorted(ids), f"{name}: kustomize renders the same {len(rids)} objects as computed here")
            imgs = {c["image"] for d in rendered if d["kind"] in ("Deployment", "StatefulSet")
                    for c in d["spec"]["template"]["spec"]["containers"]}
            R.check(any(i.rsplit("/", 1)[-1] == f"padlock:{version}" for i in imgs),
                    f"{name}: rendered image {', '.join(sorted(imgs))} (padlock:{version})")
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as t:
                t.write(p.stdout)
            try:
                validate_schema(validator, [Path(t.name)], f"{name} rendered")
            finally:
                os.unlink(t.name)
    if not kubectl:
        R.note("kubectl (with its built-in kustomize) is not installed: overlays were checked by "
               "deploy/check.py's own reading of kustomization.yaml, not rendered by kustomize")
    unused = set(manifest_files()) - included - {TOKENS_EXAMPLE}
    R.check(not unused, "every manifest file is used by some overlay", f"unused: {[rel(u) for u in unused]}")


def check_workload(w: dict, tokens_secret: dict) -> None:
    wn = f"{w['kind']}/{w['metadata']['name']}"
    tpl = w["spec"]["template"]
    R.check(selector_matches(w["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"]),
            f"{wn}: selector matches its pod labels")
    R.check(tpl["spec"].get("automountServiceAccountToken") is False, f"{wn}: no service account token mounted")
    psc = tpl["spec"].get("securityContext", {})
    for c in tpl["spec"]["containers"]:
        res = c.get("resources", {})
        R.check(all(k in res.get("requests", {}) for k in ("cpu", "memory")) and "memory" in res.get("limits", {}),
                f"{wn}: container {c['name']} has cpu/memory requests and a memory limit")
        sc = c.get("securityContext", {})
        R.check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and sc.get("capabilities", {}).get("drop") == ["ALL"]
                and psc.get("runAsNonRoot") is True
                and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                f"{wn}: container {c['name']}: non-root, read-only root fs, capabilities dropped, "
                "no privilege escalation, RuntimeDefault seccomp (restricted Pod Security Standard)")
        vnames = {v["name"] for v in tpl["spec"].get("volumes", [])} | {
            t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            R.check(m["name"] in vnames, f"{wn}: volume {m['name']} (at {m['mountPath']}) is defined")
    for v in tpl["spec"].get("volumes", []):
        if "secret" in v:
            R.check(v["secret"]["secretName"] == tokens_secret["metadata"]["name"],
                    f"{wn}: Secret {v['secret']['secretName']} is the one {rel(TOKENS_EXAMPLE)} documents")


def check_redis_refs(ov: Overlay, name: str, workloads: list[dict]) -> None:
    for w in workloads:
        c = padlockd_container(w)
        env = {e["name"]: e.get("value") for e in (c or {}).get("env", [])}
        url = env.get("PADLOCK_REDIS_URL")
        if not url:
            continue
        m = re.match(r"redis://(?:[^@]*@)?([^:/]+):(\d+)", url)
        svc = ov.find("Service", m.group(1)) if m else None
        R.check(svc is not None and any(p["port"] == int(m.group(2)) for p in svc["spec"]["ports"]),
                f"{name}: {w['metadata']['name']}'s Redis URL {url} names a Service and port of the overlay")
        if not svc:
            continue
        backends = [x for x in workloads if selector_matches(svc["spec"]["selector"], x["spec"]["template"]["metadata"]["labels"])]
        for b in backends:
            R.check(b["spec"].get("replicas") == 1 and b["spec"].get("strategy", {}).get("type") == "Recreate",
                    f"{name}: Redis {b['metadata']['name']} is one standalone server, never two (replicas 1, Recreate)")
        for np in ov.of_kind("NetworkPolicy"):
            if any(selector_matches(np["spec"]["podSelector"]["matchLabels"], b["spec"]["template"]["metadata"]["labels"]) for b in backends):
                allowed = [f["podSelector"]["matchLabels"] for r in np["spec"]["ingress"] for f in r["from"]]
                R.check(any(selector_matches(a, w["spec"]["template"]["metadata"]["labels"]) for a in allowed),
                        f"{name}: NetworkPolicy {np['metadata']['name']} lets {w['metadata']['name']} reach Redis")


CHECKED_CONFIGS: set[str] = set()


def check_padlockd_workload(cli: Cli, ov: Overlay, w: dict, image_port: int, image_lock_dir: str | None,
                            image_user: tuple[int, int] | None, secret: dict, version: str) -> None:
    wn = f"{w['kind']}/{w['metadata']['name']}"
    spec = w["spec"]["template"]["spec"]
    c = padlockd_container(w)
    R.check(c["image"] == f"padlock:{version}", f"{wn}: image padlock:{version} (workspace version)")
    R.check(not c.get("command"), f"{wn}: keeps the image's ENTRYPOINT (no `command:`)")
    for f in split_flags(c.get("args", [])):
        cli.server_flag(f, f"{wn} args")
    for e in c.get("env", []):
        if e["name"].startswith("PADLOCK_"):
            cli.server_var(e["name"], f"{wn} env")
    psc = spec.get("securityContext", {})
    if image_user:
        R.check((psc.get("runAsUser"), psc.get("runAsGroup")) == image_user,
                f"{wn}: runs as the image's user {image_user[0]}:{image_user[1]}")
    R.check(spec.get("enableServiceLinks") is False, f"{wn}: enableServiceLinks false (no injected *_PORT variables)")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    R.check(image_port in ports.values(), f"{wn}: containerPort {image_port} (the image's --listen port)")
    for kind in ("readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        if not R.check(probe is not None, f"{wn}: has a {kind}"):
            continue
        if "httpGet" in probe:
            port = probe["httpGet"]["port"]
            port = ports.get(port, port)
            want = "/readyz" if kind == "readinessProbe" else "/healthz"
            R.check(port == image_port and probe["httpGet"]["path"] in ("/readyz", "/healthz")
                    and (kind != "readinessProbe" or probe["httpGet"]["path"] == want),
                    f"{wn}: {kind} GET {probe['httpGet']['path']} on port {port}")
        elif "grpc" in probe:
            R.check(probe["grpc"]["port"] == image_port and not probe["grpc"].get("service"),
                    f"{wn}: {kind} is the gRPC health check of the whole server on port {image_port}")
        elif "exec" in probe:
            R.check(probe["exec"]["command"][:1] == ["/usr/local/bin/padlock"],
                    f"{wn}: {kind} execs padlock (the image has no shell)")
        else:
            R.fail(f"{wn}: {kind} is neither httpGet, grpc nor exec")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    lock_mount = mounts.get(image_lock_dir or "")
    R.check(lock_mount is not None and not lock_mount.get("readOnly"),
            f"{wn}: a writable volume at the image's lock directory {image_lock_dir}")
    if w["kind"] == "StatefulSet":
        vct = {t["metadata"]["name"]: t for t in w["spec"].get("volumeClaimTemplates", [])}
        R.check(lock_mount is not None and lock_mount["name"] in vct,
                f"{wn}: the lock directory is a PersistentVolumeClaim (fences survive restarts)")
        R.check(w["spec"].get("replicas") == 1, f"{wn}: one replica (one padlockd per lock directory)")
        R.check(w["spec"].get("persistentVolumeClaimRetentionPolicy", {}).get("whenDeleted") == "Retain",
                f"{wn}: the lock volume is kept when the StatefulSet is deleted")
    else:
        env = {e["name"] for e in c.get("env", [])}
        R.check("PADLOCK_REDIS_URL" in env,
                f"{wn}: a Deployment of stateless replicas serves the redis kind (PADLOCK_REDIS_URL set)")
    cfg = config_of(ov, w, c)
    if "--config" in split_flags(c.get("args", [])):
        if not R.check(cfg is not None, f"{wn}: --config names a file of a mounted ConfigMap in the overlay"):
            return
        toml, where = cfg
        if where not in CHECKED_CONFIGS:
            CHECKED_CONFIGS.add(where)
            for key in toml:
                cli.config_key(key, where)
            R.check(not ({"listen", "lock_dir"} & set(toml)),
                    f"{where}: sets neither listen nor lock_dir (the ENTRYPOINT's flags would override them)")
        grace = parse_duration(toml.get("shutdown_grace", "10s"))
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        R.check(tgps >= grace + 5,
                f"{wn}: terminationGracePeriodSeconds {tgps} > shutdown_grace {grace:g}s + 5s margin")
        ki = parse_duration(toml.get("keepalive_interval", "5s"))
        kt = parse_duration(toml.get("keepalive_timeout", "5s"))
        R.check(ki < 60 and ki + kt <= 30, f"{wn}: keepalive pings every {ki:g}s (under common 60 s idle timeouts "
                f"of load balancers), a vanished client is dropped within {ki + kt:g}s")
        for key in ("admin_token_file", "client_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            if key not in toml:
                continue
            path = toml[key]
            m = next((m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")), None)
            vol = next((v for v in spec["volumes"] if m and v["name"] == m["name"]), None)
            fname = path.rsplit("/", 1)[-1]
            ok = vol is not None and "secret" in vol and fname in secret.get("stringData", {})
            R.check(ok, f"{wn}: {key} {path} is key `{fname}` of the mounted Secret {secret['metadata']['name']}")


def check_services(ov: Overlay, name: str, workloads: list[dict]) -> None:
    for s in ov.of_kind("Service"):
        sn = f"{name}: Service/{s['metadata']['name']}"
        backends = [w for w in workloads if selector_matches(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        R.check(len(backends) == 1, f"{sn} selects exactly one workload ({', '.join(b['metadata']['name'] for b in backends)})")
        for b in backends:
            ports = {p.get("name"): p["containerPort"] for c in b["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                t = p.get("targetPort", p["port"])
                R.check(t in ports or t in ports.values(), f"{sn}: targetPort {t} is a container port of {b['metadata']['name']}")
    for sts in ov.of_kind("StatefulSet"):
        gov = ov.find("Service", sts["spec"]["serviceName"])
        R.check(gov is not None and gov["spec"].get("clusterIP") == "None",
                f"{name}: StatefulSet/{sts['metadata']['name']}'s serviceName is a headless Service")
    for pdb in ov.of_kind("PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        targets = [w for w in workloads if selector_matches(sel, w["spec"]["template"]["metadata"]["labels"])]
        R.check(len(targets) == 1, f"{name}: PodDisruptionBudget/{pdb['metadata']['name']} covers exactly one workload")
        for t in targets:
            reps = t["spec"].get("replicas", 1)
            if "maxUnavailable" in pdb["spec"]:
                R.check(pdb["spec"]["maxUnavailable"] < reps or reps == 1,
                        f"{name}: PDB {pdb['metadata']['name']} keeps replicas running during drains")
    covered = {w["metadata"]["name"] for pdb in ov.of_kind("PodDisruptionBudget") for w in workloads
               if selector_matches(pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])}
    for w in workloads:
        if padlockd_container(w):
            R.check(w["metadata"]["name"] in covered, f"{name}: {w['metadata']['name']} has a PodDisruptionBudget")


# --------------------------------------------------------------------------
# compose

def check_compose(cli: Cli, df: Dockerfile, schema_checker: str) -> dict:
    R.section(f"compose ({rel(COMPOSE)})")
    p = run([schema_checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    R.check(p.returncode == 0, "valid against the Compose Specification schema (check-jsonschema, vendored, offline)",
            (p.stdout + p.stderr).strip())
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc.get("services", {})
    R.check({"redis", "padlockd-a", "padlockd-b"} <= set(services), f"services: {', '.join(services)}")
    version = workspace_version()
    ep, _ = entrypoint_of(df)
    ep_flags = split_flags(ep[1:])
    port = (ep_flags.get("--listen") or ":0").rsplit(":", 1)[-1]
    lock_dir = ep_flags.get("--lock-dir")
    host_ports = []
    padlockds = {n: s for n, s in services.items() if n.startswith("padlockd")}
    R.check(len(padlockds) >= 2, "two padlockd instances (the scale-out demo)")
    for n, s in padlockds.items():
        b = s.get("build", {})
        ctx = (COMPOSE.parent / b.get("context", ".")).resolve()
        R.check(ctx == ROOT and (ctx / b.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE,
                f"{n}: builds {rel(DOCKERFILE)} with the repository root as context")
        R.check(s.get("image") == f"padlock:{version}", f"{n}: image padlock:{version}")
        cmd = s.get("command", [])
        R.check(isinstance(cmd, list), f"{n}: command is a list (appended to the ENTRYPOINT, no shell)")
        flags = split_flags(cmd)
        for f in flags:
            cli.server_flag(f, f"compose {n} command")
        for k in (s.get("environment") or {}):
            cli.server_var(k, f"compose {n} environment")
        url = flags.get("--redis-url") or (s.get("environment") or {}).get("PADLOCK_REDIS_URL")
        m = re.match(r"redis://(?:[^@]*@)?([^:/]+):(\d+)", url or "")
        R.check(m is not None and m.group(1) in services, f"{n}: --redis-url {url} names the compose service {m and m.group(1)}")
        R.check(bool(s.get("depends_on", {}).get(m.group(1) if m else "")), f"{n}: starts after Redis")
        for p in s.get("ports", []):
            parts = str(p).split(":")
            R.check(parts[-1] == port, f"{n}: publishes container port {port} ({p})")
            R.check(len(parts) == 3 and parts[0] in ("127.0.0.1", "::1"),
                    f"{n}: published on loopback only ({p}): the demo has no tokens")
            host_ports.append(parts[-2])
        vols = [v.split(":") for v in s.get("volumes", [])]
        R.check(any(v[1] == lock_dir for v in vols), f"{n}: a volume at the lock directory {lock_dir}")
        R.check(s.get("read_only") is True, f"{n}: read-only root filesystem")
        R.check(s.get("cap_drop") == ["ALL"], f"{n}: drops all capabilities")
        grace = parse_duration(flags.get("--shutdown-grace", "10s"))
        stop = parse_duration(s.get("stop_grace_period", "10s"))
        R.check(stop >= grace + 3, f"{n}: stop_grace_period {stop:g}s > --shutdown-grace {grace:g}s")
    R.check(len(host_ports) == len(set(host_ports)) == len(padlockds), f"distinct host ports {host_ports}")
    vol_names = [v.split(":")[0] for s in padlockds.values() for v in s.get("volumes", [])]
    R.check(len(vol_names) == len(set(vol_names)), "each instance has its own lock volume")
    R.check(set(vol_names) <= set(doc.get("volumes", {})), "named volumes are declared")
    rcmd = services["redis"].get("command", [])
    R.check("--save" in rcmd and "--appendonly" in rcmd, "Redis: persistence off, as the comment says")
    R.check("healthcheck" in services["redis"], "Redis: has a health check (padlockd waits for it)")
    # the demo commands in the comment
    demo = 0
    with R.group("the demo commands in the comment: every `padlock` subcommand and flag exists"):
        for line in COMPOSE.read_text().splitlines():
            m = re.match(r"#\s{2,}(?:docker compose -f \S+ exec (\S+) )?(padlock\s.*)", line)
            if not m:
                continue
            if m.group(1):
                R.check(m.group(1) in services, f"demo comment: `exec {m.group(1)}` names a service")
            argv = shlex.split(m.group(2).split("&")[0].split(" -- ")[0])
            sub = next((a for a in argv[1:] if not a.startswith("-") and a in cli.client_flags), None)
            R.check(sub is not None, f"demo comment: `{m.group(2)}` uses a padlock subcommand")
            for a in argv:
                if a.startswith("--"):
                    R.check(a in cli.client_flags.get(sub or "", set()), f"demo comment: `padlock {sub}` accepts {a}")
            demo += 1
    R.check(demo >= 3, f"{demo} demo commands in the compose file's comment")
    return doc


# --------------------------------------------------------------------------
# runtime: the release binaries, the way the image runs them

class Runtime:
    """Network namespaces, bubblewrap root filesystems, a real redis-server."""

    def __init__(self, bin_dir: Path, df: Dockerfile) -> None:
        self.bin_dir = bin_dir
        self.df = df
        self.tag = f"plk{os.getpid()}"
        self.sweep()
        self.tmp = Path(tempfile.mkdtemp(prefix="padlock-deploy-check-"))
        os.chmod(self.tmp, 0o755)
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.links = 0
        atexit.register(self.cleanup)
        self.hub = self.add_ns("hub")
        self.setpriv = shutil.which("setpriv")
        self.libs = self._libs([bin_dir / "padlockd", bin_dir / "padlock", Path(self.setpriv)])
        self.etc = self.tmp / "etc"
        self.etc.mkdir()
        # What gcr.io/distroless/cc-debian12 has in /etc (users, groups, nsswitch).
        (self.etc / "passwd").write_text(
            "root:x:0:0:root:/root:/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
            "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        (self.etc / "group").write_text("root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
        (self.etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
        self.redis_port = 6379
        self.redis = None

    def _libs(self, bins: list[Path]) -> dict[str, str]:
        """Sandbox path -> host file, for the dynamic loader and libraries."""
        out: dict[str, str] = {}
        for b in bins:
            for line in run(["ldd", str(b)]).stdout.splitlines():
                parts = line.split()
                if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                    out["/lib/x86_64-linux-gnu/" + parts[0]] = os.path.realpath(parts[2])
                elif parts and parts[0].startswith("/"):
                    out[parts[0]] = os.path.realpath(parts[0])
        return out

    @staticmethod
    def sweep() -> None:
        """Removes network namespaces left by an earlier run that was killed."""
        for line in run(["ip", "netns", "list"]).stdout.splitlines():
            m = re.match(r"(plk(\d+)-\S+)", line)
            if not m:
                continue
            try:
                alive = "check.py" in Path(f"/proc/{m.group(2)}/cmdline").read_text()
            except OSError:
                alive = False
            if not alive:
                run(["ip", "netns", "del", m.group(1)])

    def cleanup(self) -> None:
        for p in self.procs:
            kill_group(p)  # bwrap and everything it started, whatever their uid
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.netns):
            run(["ip", "netns", "del", ns])
        self.netns = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add_ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        p = run(["ip", "netns", "add", ns])
        if p.returncode != 0:
            raise RuntimeError(f"ip netns add {ns}: {p.stderr.strip()}")
        self.netns.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        return ns

    def link(self, ns: str) -> tuple[str, str]:
        """A veth from the hub to ns; returns (hub address, container address)."""
        self.links += 1
        n = self.links
        hub_if = f"{self.tag}h{n}"[-15:]
        run(["ip", "link", "add", hub_if, "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
        hub_ip, ip = f"10.231.{n}.1", f"10.231.{n}.2"
        run(["ip", "-n", self.hub, "addr", "add", f"{hub_ip}/30", "dev", hub_if], check=True)
        run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", "eth0"], check=True)
        run(["ip", "-n", self.hub, "link", "set", hub_if, "up"], check=True)
        run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        return hub_ip, ip

    def start_redis(self) -> None:
        d = self.tmp / "redis"
        d.mkdir()
        log = open(d / "log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.hub, "redis-server", "--port", str(self.redis_port),
                              "--bind", "0.0.0.0", "--save", "", "--appendonly", "no", "--protected-mode", "no",
                              "--dir", str(d)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        for _ in range(100):
            if run(["ip", "netns", "exec", self.hub, "redis-cli", "-p", str(self.redis_port), "ping"]).stdout.strip() == "PONG":
                self.redis = p
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def in_ns(self, ns: str, argv: list[str], env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
        return run_group(["ip", "netns", "exec", ns] + argv, timeout, env={**os.environ, **(env or {})})


class Container:
    """One container: a netns, a bubblewrap root like the image's, a user."""

    def __init__(self, rt: Runtime, name: str, *, uid: int, gid: int, groups: list[int], env: dict[str, str],
                 volumes: dict[str, Path], ro_volumes: dict[str, Path] | None = None,
                 hosts: dict[str, str] | None = None, linked: bool = True) -> None:
        self.rt, self.name = rt, name
        self.uid, self.gid, self.groups = uid, gid, groups
        self.env, self.volumes, self.ro_volumes = env, volumes, ro_volumes or {}
        self.ns = rt.add_ns(name)
        self.hub_ip = self.ip = None
        if linked:
            self.hub_ip, self.ip = rt.link(self.ns)
        hosts_file = rt.tmp / f"hosts-{name}"
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        if self.ip:
            lines.append(f"{self.ip} {name}")
        lines += [f"{ip} {h}" for h, ip in (hosts or {}).items()]
        hosts_file.write_text("\n".join(lines) + "\n")
        self.hosts_file = hosts_file
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.out = rt.tmp / f"{name}.out"
        self.err = rt.tmp / f"{name}.err"

    def bwrap(self, argv: list[str], env: dict[str, str], pid1: bool) -> list[str]:
        rt = self.rt
        cmd = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--hostname", self.name, "--clearenv"]
        if pid1:
            cmd.append("--as-pid-1")
        for k, v in env.items():
            cmd += ["--setenv", k, v]
        binds = [("--ro-bind", src, dst) for dst, src in sorted(rt.libs.items())]
        binds += [("--ro-bind", str(rt.bin_dir / "padlockd"), "/usr/local/bin/padlockd"),
                  ("--ro-bind", str(rt.bin_dir / "padlock"), "/usr/local/bin/padlock"),
                  ("--ro-bind", rt.setpriv, "/.runtime/setpriv")]
        binds += [("--ro-bind", str(rt.etc / f), f"/etc/{f}") for f in ("passwd", "group", "nsswitch.conf")]
        binds += [("--ro-bind", str(self.hosts_file), "/etc/hosts")]
        binds += [("--ro-bind", str(src), dst) for dst, src in self.ro_volumes.items()]
        binds += [("--bind", str(src), dst) for dst, src in self.volumes.items()]
        # Directories as an image has them (bwrap would make missing parents 0700).
        parents = sorted({str(p) for _, _, dst in binds for p in Path(dst).parents if str(p) != "/"}
                         | {"/home", "/home/nonroot", "/var", "/usr"}, key=lambda p: (p.count("/"), p))
        for d in parents:
            cmd += ["--perms", "0755", "--dir", d]
        cmd += ["--perms", "1777", "--dir", "/tmp"]
        for b in binds:
            cmd += list(b)
        cmd += ["--proc", "/proc", "--dev", "/dev"]
        cmd += ["--remount-ro", "/", "--chdir", "/"]
        groups = ",".join(str(g) for g in self.groups)
        cmd += ["--", "/.runtime/setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                f"--groups={groups}" if groups else "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"] + argv
        return ["ip", "netns", "exec", self.ns] + cmd

    def base_env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOSTNAME": self.name, "HOME": "/home/nonroot", **self.env}

    def start(self, argv: list[str]) -> None:
        r, w = os.pipe()
        cmd = self.bwrap(argv, self.base_env(), pid1=True)
        cmd.insert(cmd.index("bwrap") + 1, "--info-fd")
        cmd.insert(cmd.index("--info-fd") + 1, str(w))
        self.proc = subprocess.Popen(cmd, stdout=open(self.out, "w"), stderr=open(self.err, "w"), pass_fds=(w,),
                                     start_new_session=True)
        self.rt.procs.append(self.proc)
        os.close(w)
        data = b""
        deadline = time.time() + 10
        while time.time() < deadline:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
            try:
                self.pid = json.loads(data)["child-pid"]
                break
            except (json.JSONDecodeError, KeyError):
                continue
        os.close(r)
        if self.pid is None:
            raise RuntimeError(f"{self.name}: bwrap did not start: {self.err.read_text()}")

    def wait_listening(self, timeout: float = 10) -> str | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"padlockd listening on (\S+)", self.out.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def exec(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
        """Like `docker exec`: same root filesystem, user, network and image env."""
        return run_group(self.bwrap(argv, {**self.base_env(), **(env or {})}, pid1=False), timeout)

    def exec_bg(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        out = self.rt.tmp / f"{self.name}-exec-{time.time_ns()}.out"
        p = subprocess.Popen(self.bwrap(argv, {**self.base_env(), **(env or {})}, pid1=False),
                             stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.rt.procs.append(p)
        return p, out

    def status(self) -> dict[str, str]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
        return out

    def writable_mounts(self) -> list[str]:
        rw = []
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            f = line.split()
            mount_point, opts = f[4], f[5].split(",")
            if "rw" in opts:
                rw.append(mount_point)
        return rw

    def listening(self) -> list[str]:
        return self.rt.in_ns(self.ns, ["ss", "-ltnH"]).stdout.split("\n")

    def stop(self, timeout: float) -> tuple[int | None, float]:
        t0 = time.time()
        os.kill(self.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            rc = None
        return rc, time.time() - t0


def wait_for(path: Path, pattern: str, timeout: float = 10) -> re.Match | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, path.read_text())
        if m:
            return m
        time.sleep(0.05)
    return None


def files_under(d: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out.append((str(p.relative_to(d)), st.st_uid, st.st_gid))
    return out


def check_container_basics(c: Container, label: str, port: str, uid: int, gid: int, writable: set[str]) -> None:
    listen = c.wait_listening()
    if not R.check(listen is not None, f"{label}: padlockd starts and prints its address ({listen})",
                   c.err.read_text()[-800:]):
        return
    lines = c.listening()
    R.check(any(re.search(rf"\s(0\.0\.0\.0|\*|\[::\]):{port}\s", l + " ") for l in lines),
            f"{label}: listens on 0.0.0.0:{port} (reachable on the container's address)")
    st = c.status()
    R.check(st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4,
            f"{label}: runs as uid {uid} gid {gid} (real, effective, saved, fs)")
    R.check(int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapBnd"], 16) == 0,
            f"{label}: no capabilities (effective, permitted, bounding)")
    R.check(st.get("NoNewPrivs") == "1", f"{label}: no_new_privs set (allowPrivilegeEscalation: false)")
    R.check(Path(f"/proc/{c.pid}/status").read_text().count("NSpid") and st["NSpid"].split()[-1] == "1",
            f"{label}: padlockd is PID 1 in its container, as in Docker (signals reach it directly)")
    rw = set(c.writable_mounts())
    extra = {m for m in rw - writable if m != "/proc" and m != "/dev" and not m.startswith("/dev/")}
    R.check("/" not in rw and not extra,
            f"{label}: root filesystem read-only; writable: {', '.join(sorted(rw & writable))} (+ /proc, /dev)",
            f"also writable: {sorted(extra)}")


def runtime_image(rt: Runtime, df: Dockerfile) -> None:
    R.section("runtime: the image's ENTRYPOINT, USER, VOLUME and HEALTHCHECK, with the release binaries")
    ep, cmd = entrypoint_of(df)
    uid, gid = df.user()
    flags = split_flags(ep[1:] + cmd)
    port = flags["--listen"].rsplit(":", 1)[-1]
    lock_dir = flags["--lock-dir"]
    vol = rt.tmp / "docker-volume"
    vol.mkdir()
    os.chown(vol, uid, gid)  # COPY --chown: a new named volume starts as a copy of it
    os.chmod(vol, 0o755)
    c = Container(rt, "docker", uid=uid, gid=gid, groups=[], env=df.env(), volumes={lock_dir: vol}, linked=False)
    c.start(ep + cmd)
    print(f"  (docker run --read-only --cap-drop ALL --security-opt no-new-privileges -v VOLUME:{lock_dir} "
          f"image = {shlex.join(ep + cmd)} as {uid}:{gid} with {df.env()}; no shell in the root filesystem)")
    check_container_basics(c, "docker run", port, uid, gid, {lock_dir})
    if c.proc.poll() is not None:
        return
    _, hc_argv = df.healthcheck()
    p = c.exec(hc_argv, timeout=10)
    R.check(p.returncode == 0, f"HEALTHCHECK `{shlex.join(hc_argv)}` exits 0 inside the container ({p.stdout.strip()})",
            p.stderr.strip())
    R.check(c.exec(["/bin/sh", "-c", "true"]).returncode != 0, "the root filesystem has no /bin/sh, and nothing needs it")
    holder, hold_out = c.exec_bg(["/usr/local/bin/padlock", "hold", "deploy-check/file"])
    m = wait_for(hold_out, r"granted \S+ fence=(\d+)")
    R.check(m is not None, f"`padlock hold` (the image's CLI) gets a file lock: {m and m.group(0)}", hold_out.read_text())
    p = c.exec(["/usr/local/bin/padlock", "run", "--wait", "0", "deploy-check/file", "--", "/usr/local/bin/padlock", "--version"])
    R.check(p.returncode == 75, f"a second client is refused while it is held (exit {p.returncode}, expected 75)")
    files = files_under(vol)
    names = [f[0] for f in files]
    R.check("deploy-check/file" in names and any(n.startswith(".padlock/fences") for n in names),
            f"lock file and fence state are in the volume ({len(files)} entries: {', '.join(names)})")
    R.check(all(f[1] == uid for f in files), f"everything in the volume is owned by uid {uid}")
    code = rt.in_ns(c.ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                           f"http://127.0.0.1:{port}/healthz"]).stdout
    R.check(code == "200", f"GET /healthz on the same port: {code}")
    rc, took = c.stop(timeout=20)
    grace = parse_duration(flags.get("--shutdown-grace", "10s"))
    R.check(rc == 0 and took < grace, f"SIGTERM: padlockd exits {rc} after {took:.2f}s (grace {grace:g}s)",
            c.err.read_text()[-500:])
    try:
        holder.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill_group(holder)
    R.check(holder.returncode == 70 and "shutting down" in hold_out.read_text(),
            f"the holder was told its lock is lost (shutdown) and exited {holder.returncode}")
    p = c.exec(hc_argv, timeout=10)
    R.check(p.returncode != 0, f"with padlockd stopped the HEALTHCHECK fails (exit {p.returncode})")
    # A restart on the same volume: fences go on increasing.
    first = int(m.group(1)) if m else 0
    c2 = Container(rt, "docker2", uid=uid, gid=gid, groups=[], env=df.env(), volumes={lock_dir: vol}, linked=False)
    c2.start(ep + cmd)
    if c2.wait_listening():
        holder2, out2 = c2.exec_bg(["/usr/local/bin/padlock", "hold", "deploy-check/file"])
        m2 = wait_for(out2, r"granted \S+ fence=(\d+)")
        R.check(m2 is not None and int(m2.group(1)) > first,
                f"restarted on the same volume, the next fence is larger ({m2 and m2.group(1)} > {first})")
        c2.stop(timeout=20)
        holder2.wait(timeout=5)
    else:
        R.fail(f"restart on the same volume: {c2.err.read_text()[-500:]}")


def runtime_compose(rt: Runtime, df: Dockerfile, doc: dict) -> None:
    R.section("runtime: the compose demo (two padlockd on one redis-server, redis kind)")
    ep, _ = entrypoint_of(df)
    uid, gid = df.user()
    lock_dir = split_flags(ep[1:])["--lock-dir"]
    services = doc["services"]
    names = sorted(n for n in services if n.startswith("padlockd"))
    containers: dict[str, Container] = {}
    for n in names:
        s = services[n]
        vol = rt.tmp / f"compose-{n}"
        vol.mkdir()
        os.chown(vol, uid, gid)
        env = {**df.env(), **{k: str(v) for k, v in (s.get("environment") or {}).items()}}
        c = Container(rt, n, uid=uid, gid=gid, groups=[], env=env, volumes={lock_dir: vol})
        c.hosts_file.write_text(c.hosts_file.read_text() + f"{c.hub_ip} redis\n")
        c.start(ep + s.get("command", []))
        containers[n] = c
    print(f"  (each service in its own network namespace, `redis` resolving to a real redis-server; "
          f"command = ENTRYPOINT + compose `command`; the CLI is run inside the containers, "
          f"as `docker compose exec` would; host port publishing is not emulated)")
    for n, c in containers.items():
        check_container_basics(c, f"compose {n}", "7420", uid, gid, {lock_dir})
    a, b = (containers[n] for n in names[:2])
    if a.proc.poll() is not None or b.proc.poll() is not None:
        return
    holder, out = a.exec_bg(["/usr/local/bin/padlock", "hold", "--kind", "redis", "demo/report"])
    m = wait_for(out, r"granted \S+ fence=(\d+)")
    R.check(m is not None, f"{names[0]}: `padlock hold --kind redis demo/report` is granted ({m and m.group(0)})", out.read_text())
    try_b = ["/usr/local/bin/padlock", "run", "--kind", "redis", "--wait", "0", "demo/report", "--",
             "/usr/local/bin/padlock", "--version"]
    p = b.exec(try_b)
    R.check(p.returncode == 75, f"{names[1]}: the same redis lock is refused while {names[0]} holds it "
            f"(exit {p.returncode}, expected 75)", p.stderr.strip())
    p = b.exec(["/usr/local/bin/padlock", "run", "--kind", "file", "--wait", "0", "demo/report", "--",
                "/usr/local/bin/padlock", "--version"])
    R.check(p.returncode == 0, f"{names[1]}: a FILE lock of the same name is granted (file locks are per instance, "
            "as the compose comment warns)")
    os.killpg(holder.pid, signal.SIGTERM)
    holder.wait(timeout=10)
    t0 = time.time()
    p = b.exec([a if a != "0" else "5" for a in try_b])
    R.check(p.returncode == 0, f"{names[1]}: granted once {names[0]}'s holder released "
            f"(exit {p.returncode}, {time.time() - t0:.2f}s)", p.stderr.strip())
    grace = parse_duration(split_flags(services[names[0]].get("command", [])).get("--shutdown-grace", "10s"))
    for n, c in containers.items():
        rc, took = c.stop(timeout=20)
        R.check(rc == 0 and took < grace, f"compose {n}: SIGTERM -> exit {rc} after {took:.2f}s")


def runtime_kubernetes(rt: Runtime, df: Dockerfile, cli: Cli) -> None:
    R.section("runtime: each Kubernetes pod (ConfigMap, Secret, volumes, securityContext, probes, grace)")
    overlay = K8S / "overlays" / "all" / "kustomization.yaml"
    ov = Overlay(overlay)
    secret = load_docs(TOKENS_EXAMPLE)[0]
    tokens = [l.split() for l in secret["stringData"]["client-tokens"].splitlines()
              if l.strip() and not l.strip().startswith("#")]
    ep, cmd = entrypoint_of(df)
    print(f"  (the pods of {rel(overlay.parent)}, one replica each; Secret from {rel(TOKENS_EXAMPLE)}; volumes "
          "as the kubelet makes them (root:fsGroup, setgid); probes sent from outside the pod to its address; "
          "a gRPC probe, if any, is made with `padlock health`, the same grpc.health.v1 check)")
    for w in ov.of_kind("Deployment", "StatefulSet"):
        c = padlockd_container(w)
        if not c:
            continue
        spec = w["spec"]["template"]["spec"]
        label = f"{w['kind']}/{w['metadata']['name']}"
        if "--config" in split_flags(c.get("args", [])) and "--config" not in cli.server_flags:
            R.note(f"{label}: not run (padlockd has no --config yet)")
            continue
        psc = spec["securityContext"]
        uid, gid, fsg = psc["runAsUser"], psc["runAsGroup"], psc.get("fsGroup")
        base = rt.tmp / f"pod-{w['metadata']['name']}"
        base.mkdir()
        vols: dict[str, Path] = {}
        ro: dict[str, Path] = {}
        for m in c.get("volumeMounts", []):
            d = base / m["name"]
            d.mkdir(exist_ok=True)
            v = next((v for v in spec.get("volumes", []) if v["name"] == m["name"]), None)
            if v and "configMap" in v:
                for k, text in ov.find("ConfigMap", v["configMap"]["name"])["data"].items():
                    (d / k).write_text(text)
                    os.chown(d / k, 0, fsg if fsg is not None else 0)
                    os.chmod(d / k, v["configMap"].get("defaultMode", 0o644))
            elif v and "secret" in v:
                for k, text in secret["stringData"].items():
                    (d / k).write_text(text)
                    os.chown(d / k, 0, fsg if fsg is not None else 0)
                    os.chmod(d / k, v["secret"].get("defaultMode", 0o644))
            else:  # emptyDir or PersistentVolumeClaim, after the kubelet applied fsGroup
                os.chown(d, 0, fsg if fsg is not None else 0)
                os.chmod(d, 0o2770)
            os.chmod(base, 0o755)
            (ro if m.get("readOnly") else vols)[m["mountPath"]] = d
        env = {**df.env(), **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}
        url = env.get("PADLOCK_REDIS_URL")
        pod = Container(rt, w["metadata"]["name"][:20], uid=uid, gid=gid, groups=[fsg] if fsg else [], env=env,
                        volumes=vols, ro_volumes=ro)
        if url:
            host = re.match(r"redis://(?:[^@]*@)?([^:/]+)", url).group(1)
            pod.hosts_file.write_text(pod.hosts_file.read_text() + f"{pod.hub_ip} {host}\n")
        cfg = config_of(ov, w, c)
        cfg_toml = cfg[0] if cfg else {}
        pod.start(ep + cmd + c.get("args", []))
        port = str(c["ports"][0]["containerPort"])
        check_container_basics(pod, label, port, uid, gid, {m for m in vols})
        if pod.proc.poll() is not None:
            continue
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c[kind]
            if "httpGet" in probe:
                url_p = f"http://{pod.ip}:{probe['httpGet']['port']}{probe['httpGet']['path']}"
                code = rt.in_ns(rt.hub, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                                         str(probe.get("timeoutSeconds", 1)), url_p]).stdout
                R.check(code.startswith("2"), f"{label}: {kind} GET {url_p} -> {code}")
            elif "grpc" in probe:
                p = rt.in_ns(rt.hub, [str(rt.bin_dir / "padlock"), "--server", f"http://{pod.ip}:{probe['grpc']['port']}",
                                      "health"], timeout=probe.get("timeoutSeconds", 1) + 5)
                R.check(p.returncode == 0, f"{label}: {kind} gRPC health on {pod.ip}:{probe['grpc']['port']} -> "
                        f"{p.stdout.strip()}", p.stderr.strip())
        kind = "redis" if url else "file"
        server = f"http://{pod.ip}:{port}"
        client = [str(rt.bin_dir / "padlock"), "--server", server]
        scoped = next((t for t in tokens if len(t) > 1), None)
        if scoped:
            name = scoped[1] + "deploy-check"
            p = rt.in_ns(rt.hub, client + ["run", "--kind", kind, "--wait", "0", name, "--", "true"])
            R.check(p.returncode != 0 and "unauthenticated" in p.stderr.lower(),
                    f"{label}: without a token a lock is refused (client_token_file from the ConfigMap, "
                    "file from the Secret)", p.stderr.strip())
            hold_out = rt.tmp / f"{label.replace('/', '-')}-hold.out"
            holder = subprocess.Popen(["ip", "netns", "exec", rt.hub] + client + ["hold", "--kind", kind, name],
                                      stdout=open(hold_out, "w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, "PADLOCK_TOKEN": scoped[0]}, start_new_session=True)
            rt.procs.append(holder)
            m = wait_for(hold_out, r"granted .*")
            R.check(m is not None, f"{label}: with the Secret's `{scoped[1]}` token a {kind} lock "
                    f"is granted: {m and m.group(0)}", hold_out.read_text())
        grace = parse_duration(cfg_toml.get("shutdown_grace", "10s"))
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        logs = [l for l in pod.err.read_text().splitlines() if l.strip()]
        fmt = cfg_toml.get("log_format")
        if fmt == "json":
            def is_json(line: str) -> bool:
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
            R.check(bool(logs) and all(is_json(l) for l in logs),
                    f"{label}: logs are JSON lines ({len(logs)} so far): log_format from the ConfigMap took effect")
        for l in logs:
            if '"level":"WARN"' in l or " WARN " in l:
                R.note(f"{label}: padlockd warned: {l[:300]}")
        rc, took = pod.stop(timeout=tgps)
        R.check(rc == 0 and took < min(grace, tgps),
                f"{label}: SIGTERM with a lock held -> exit {rc} after {took:.2f}s "
                f"(shutdown_grace {grace:g}s < terminationGracePeriodSeconds {tgps})", pod.err.read_text()[-500:])
        if scoped:
            try:
                holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_group(holder)
            R.check(holder.returncode == 70 and "shutting down" in hold_out.read_text(),
                    f"{label}: the holder was told Lost (shutdown) and exited {holder.returncode}")
        files = files_under(vols[split_flags(ep[1:])["--lock-dir"]])
        R.check(all(f[1] == uid for f in files) and files,
                f"{label}: {len(files)} entries written in the lock volume, all by uid {uid}")


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release")
    ap.add_argument("--kubernetes-validate", default="kubernetes-validate")
    ap.add_argument("--check-jsonschema", default="check-jsonschema")
    ap.add_argument("--hadolint", default="hadolint")
    ap.add_argument("--no-runtime", action="store_true", help="skip the runtime checks (they need root)")
    args = ap.parse_args()
    t0 = time.time()

    R.section(f"flags: what padlockd and padlock accept ({rel(args.bin_dir)})")
    cli = Cli(args.bin_dir)
    R.check(len(cli.server_flags) > 5, f"padlockd --help lists {len(cli.server_flags)} flags, "
            f"{len(cli.server_env)} PADLOCK_* variables")
    for f in sorted(PENDING_FLAGS):
        if f not in cli.server_flags:
            R.note(f"padlockd has no {f} yet: its uses are reported, not checked")

    df = check_dockerfile(cli, args.hadolint)
    check_kubernetes(cli, df, args.kubernetes_validate)
    doc = check_compose(cli, df, args.check_jsonschema)

    if args.no_runtime:
        R.note("runtime checks skipped (--no-runtime)")
    elif os.geteuid() != 0:
        R.note("runtime checks skipped: they need root (network namespaces, bubblewrap, setpriv)")
        if os.environ.get("CI") == "true":
            R.fail("CI must run the runtime checks (run as root)")
    else:
        def stop(signum, _frame):
            raise SystemExit(f"deploy/check.py: signal {signum}")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        rt = None
        try:
            rt = Runtime(args.bin_dir, df)
            rt.start_redis()
            runtime_image(rt, df)
            runtime_compose(rt, df, doc)
            runtime_kubernetes(rt, df, cli)
        except (OSError, RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as e:
            R.fail(f"runtime checks stopped: {e!r}")
        finally:
            if rt:
                rt.cleanup()

    print(f"\n{len(R.notes)} note(s); {time.time() - t0:.1f}s")
    for f in R.failed:
        print(f"FAILED: {f}")
    print(f"deploy/check: {R.passed} passed, {len(R.failed)} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
