"""Command line: ``plugin-daemon serve`` (the daemon) and ``plugin-daemon install``.

Every flag has an environment variable of the same meaning; a flag wins.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.config import CodecName, Settings, ValidatorBackend, ValidatorDesign
from daemon.install import InstallError, ensure_venv
from daemon.manifest import ManifestError, discover
from daemon.validation import BackendUnavailable, check_backend

log = logging.getLogger("daemon")

FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "server_host", {"help": "address to bind (SERVER_HOST, default 127.0.0.1)"}),
    ("--port", "server_port", {"type": int, "help": "port (SERVER_PORT, default 5002)"}),
    ("--plugins", "plugins_dir", {"help": "plugins directory (PLUGINS_DIR, default ./plugins)"}),
    ("--state-dir", "state_dir", {"help": "key file and storage (STATE_DIR, default ./.daemon-state)"}),
    (
        "--validator",
        "validator",
        {
            "choices": [d.value for d in ValidatorDesign],
            "help": "output validation design (VALIDATOR, default owner; none skips validation)",
        },
    ),
    (
        "--validator-backend",
        "validator_backend",
        {
            "choices": [b.value for b in ValidatorBackend],
            "help": "JSON Schema implementation (VALIDATOR_BACKEND, default jsonschema)",
        },
    ),
    ("--codec", "codec", {"choices": [c.value for c in CodecName], "help": "JSON codec (CODEC)"}),
    ("--instances", "plugin_instances", {"type": int, "help": "instances per plugin (PLUGIN_INSTANCES)"}),
    (
        "--timeout",
        "plugin_max_execution_timeout",
        {"type": float, "help": "seconds an invocation may run (PLUGIN_MAX_EXECUTION_TIMEOUT)"},
    ),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugin-daemon", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    install = sub.add_parser("install", help="create every plugin's virtualenv, then exit")
    for flag, dest, options in FLAGS:
        serve.add_argument(flag, dest=dest, default=None, **options)
    install.add_argument("--plugins", dest="plugins_dir", default=None)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {dest: getattr(args, dest, None) for _, dest, _ in FLAGS}
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        sys.exit(f"plugin-daemon: invalid settings: {problems}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_key(settings: Settings) -> str:
    """``SERVER_KEY``, else the key in the state directory, else a new one.

    A new key is shown once, and only on a terminal: where stdout is a pipe or a file
    (systemd's journal, a container log) it would stay readable long after, so there
    the daemon says where the key is instead.
    """
    if settings.server_key:
        return settings.server_key
    if not _is_loopback(settings.server_host):
        sys.exit(
            f"plugin-daemon: refusing to bind {settings.server_host} without SERVER_KEY; "
            "set SERVER_KEY or bind a loopback address"
        )
    path = settings.key_file
    if path.exists():
        log.info("using the server key stored in %s", path)
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    if sys.stdout.isatty():
        print(f"Generated server key (stored in {path}, mode 0600): {key}", flush=True)
    else:
        print(
            f"Generated server key, stored in {path} (mode 0600); not shown: stdout is not a terminal",
            flush=True,
        )
    return key


def serve(settings: Settings) -> None:
    import uvicorn

    from daemon.app import create_app

    try:
        check_backend(settings.validator_backend)
    except BackendUnavailable as exc:
        sys.exit(f"plugin-daemon: {exc}")
    key = server_key(settings)
    app = create_app(settings, key)
    loop = settings.event_loop.value
    log.info("listening on http://%s:%d", settings.server_host, settings.server_port)
    uvicorn.run(
        app,
        host=settings.server_host,
        port=settings.server_port,
        loop=loop,
        http="httptools",
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


async def _install(plugins_dir: Path) -> int:
    specs, errors = discover(plugins_dir)
    for name, error in errors.items():
        print(f"{name}: not a usable plugin: {error}", file=sys.stderr)
    failed = bool(errors)
    for spec in specs:
        try:
            python = await ensure_venv(spec, os.environ.get("PYTHON_INTERPRETER_PATH"))
            print(f"{spec.id}: ready ({python})")
        except InstallError as exc:
            print(f"{spec.id}: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "install":
        plugins = Path(args.plugins_dir or os.environ.get("PLUGINS_DIR", "plugins"))
        try:
            sys.exit(asyncio.run(_install(plugins)))
        except ManifestError as exc:
            sys.exit(f"plugin-daemon: {exc}")
    serve(_settings(args))
