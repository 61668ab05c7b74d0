"""The servers a benchmark run compares: daemon variants and the bare relay baselines.

Every server relays the same private copy of ``fastproto`` (one plugin process,
the same interpreter) on loopback, so only the relay in between differs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.config import Settings, ValidatorBackend
from daemon.install import ensure_venv
from daemon.manifest import load_plugin
from daemon.testing import REPO, Daemon, copy_plugin, free_port, start_daemon

PLUGIN_ID = "demo/fastproto"


@dataclass(frozen=True)
class Variant:
    """One server configuration. ``kind`` is ``daemon`` or ``relay``."""

    name: str
    kind: str
    settings: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        options = " ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.kind} {options}".strip()


# The validator backend the daemon ships with (``VALIDATOR_BACKEND``'s default): a benchmark
# measures the daemon as shipped unless a variant names another.
SHIPPED_BACKEND = Settings.model_fields["validator_backend"].default.value
PYTHON_BACKEND = ValidatorBackend.JSONSCHEMA.value


def daemon_variant(
    name: str,
    *,
    codec: str = "orjson",
    validator: str = "owner",
    backend: str = SHIPPED_BACKEND,
    tracing: bool = False,
) -> Variant:
    """Tracing follows the OpenTelemetry contract: off is ``OTEL_SDK_DISABLED=true``,
    on is the SDK enabled with every trace sampled (``OTEL_TRACES_SAMPLER=always_on``)."""
    settings = {"codec": codec, "validator": validator, "validator_backend": backend}
    if tracing:
        settings["otel_traces_sampler"] = "always_on"
    else:
        settings["otel_sdk_disabled"] = "true"
    return Variant(name, "daemon", settings)


def source_variant(name: str, revision: str, **options: Any) -> Variant:
    """The daemon as it was at ``revision`` (a git commit), e.g. before tracing existed."""
    variant = daemon_variant(name, **options)
    return Variant(name, "daemon", variant.settings | {"source_revision": revision})


def patched_variant(name: str, patches: list[Path], **options: Any) -> Variant:
    """The daemon as committed (``HEAD``) with ``patches`` applied in order: an ablation (a
    path cut out, another recorder put in), run beside the daemon as it is."""
    variant = daemon_variant(name, **options)
    return Variant(name, "daemon", variant.settings | {"source_patches": os.pathsep.join(map(str, patches))})


def interpreter_variant(python: str, **options: Any) -> Variant:
    """The daemon as it is, on another interpreter (``python``: a venv's, with the daemon's
    dependencies installed), named after its version."""
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    variant = daemon_variant(f"daemon on {version}", **options)
    return Variant(variant.name, "daemon", variant.settings | {"interpreter": python})


def relay_variant(name: str, *, codec: str, coalesce: bool) -> Variant:
    return Variant(name, "relay", {"codec": codec, "coalesce": str(coalesce).lower()})


class Server:
    """A running server: its pid (for CPU, RSS and py-spy), address and headers."""

    def __init__(self, variant: Variant, workdir: Path) -> None:
        self.variant = variant
        self.workdir = workdir
        self.pid = 0
        self.port = 0
        self.headers: dict[str, str] = {}
        self._daemon: Daemon | None = None
        self._relay: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True)
        plugins = self.workdir / "plugins"
        plugins.mkdir()
        plugin_dir = copy_plugin("fastproto", plugins)
        if self.variant.kind == "daemon":
            settings = dict(self.variant.settings)
            source = REPO
            revision = settings.pop("source_revision", None)
            patches = settings.pop("source_patches", None)
            interpreter = settings.pop("interpreter", None)
            if revision is not None or patches is not None:
                source = export_revision(revision or "HEAD", self.workdir / "source")
            for patch in patches.split(os.pathsep) if patches else ():
                apply_patch(Path(patch).resolve(), source)
            self._daemon = start_daemon(
                plugins,
                self.workdir / "state",
                self.workdir / "server.log",
                source=source,
                python=interpreter,
                **settings,
            )
            self._daemon.wait_ready(PLUGIN_ID)
            self.pid = self._daemon.proc.pid
            self.port = int(self._daemon.url.rsplit(":", 1)[1])
            self.headers = {k: v for k, v in self._daemon.headers(PLUGIN_ID).items()}
            return
        python = asyncio.run(ensure_venv(load_plugin(plugin_dir), None))
        self.port = free_port()
        command = [sys.executable, "-m", "bench.relay", "--port", str(self.port)]
        command += [
            "--plugin",
            str(plugin_dir),
            "--python",
            str(python),
            "--codec",
            self.variant.settings["codec"],
        ]
        if self.variant.settings["coalesce"] == "true":
            command.append("--coalesce")
        log = (self.workdir / "server.log").open("wb")
        self._relay = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self._relay.pid
        self.headers = {"content-type": "application/json", "x-plugin-id": PLUGIN_ID}
        deadline = time.monotonic() + 120
        while True:
            if self._relay.poll() is not None:
                raise RuntimeError(f"relay exited: {(self.workdir / 'server.log').read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/check", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not come up")
            time.sleep(0.05)

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def plugin_pids(self) -> list[int]:
        return [child.pid for child in self.process.children(recursive=True)]

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        if self._relay is not None and self._relay.poll() is None:
            self._relay.send_signal(signal.SIGTERM)
            try:
                self._relay.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._relay.kill()
                self._relay.wait()


def export_revision(revision: str, dest: Path) -> Path:
    """The daemon package at ``revision``, unpacked into ``dest`` (``git archive``: no checkout)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "daemon"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def apply_patch(patch: Path, source: Path) -> None:
    """Apply a diff of the daemon package (paths ``a/daemon/...``) to an exported copy."""
    subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=source, check=True)


def prepare_environment() -> dict[str, Any]:
    """Keep the caller's tracing settings out of the servers: each variant sets its own."""
    removed = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OTEL_")}
    return removed
