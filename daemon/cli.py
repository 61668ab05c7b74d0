"""Command line: ``plugin-daemon serve`` runs the daemon, ``install`` makes the plugins' venvs.

Every flag has an environment variable of the same meaning; a flag wins.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import sys
import textwrap
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.config import CodecName, Settings, ValidatorBackend, ValidatorDesign
from daemon.install import InstallError, ensure_venv
from daemon.manifest import ManifestError, discover
from daemon.packages import commands as package_commands
from daemon.state import Database, DatabaseError
from daemon.validation import BackendUnavailable, check_backend

log = logging.getLogger("daemon")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# flag, Settings field (its environment variable is the field's name in capitals), argparse options
FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "server_host", {"metavar": "HOST"}),
    ("--port", "server_port", {"type": int, "metavar": "PORT"}),
    ("--plugins", "plugins_dir", {"metavar": "DIR"}),
    ("--state-dir", "state_dir", {"metavar": "DIR"}),
    ("--validator", "validator", {"choices": [d.value for d in ValidatorDesign]}),
    ("--validator-backend", "validator_backend", {"choices": [b.value for b in ValidatorBackend]}),
    ("--codec", "codec", {"choices": [c.value for c in CodecName]}),
    ("--instances", "plugin_instances", {"type": int, "metavar": "N"}),
    ("--timeout", "plugin_max_execution_timeout", {"type": float, "metavar": "SECONDS"}),
]
FLAG_OF = {dest: flag for flag, dest, _ in FLAGS}


def _default(field: str) -> str | None:
    value = Settings.model_fields[field].default
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _explain(field: str) -> str:
    default = _default(field)
    description = str(Settings.model_fields[field].description)
    return description if default is None else f"{description}; default {default}"


def _describe(field: str) -> str:
    """A flag's help: what the setting does, its environment variable and its default."""
    return f"{_explain(field)} ({field.upper()})"


def _env_only_epilog() -> str:
    rows = [(f.upper(), _explain(f)) for f in Settings.model_fields if f not in FLAG_OF]
    rows += [("LOG_LEVEL", "as --log-level; default info"), ("OTEL_*", "standard OpenTelemetry variables")]
    width = max(len(name) for name, _ in rows) + 4
    lines = [
        textwrap.fill(text, 100, initial_indent=f"  {name:<{width - 2}}", subsequent_indent=" " * width)
        for name, text in rows
    ]
    return "settings only as environment variables:\n" + "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps help text between words only (``.daemon-state`` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the subcommand, neither default hides the other.
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="log level (LOG_LEVEL; default info): %(choices)s",
        metavar="LEVEL",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plugin-daemon",
        description="A plugin daemon for Dify tool plugins. Every flag has an environment variable "
        "of the same meaning; a flag wins.",
    )
    _add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Every flag has an environment variable; a flag wins.",
        epilog=_env_only_epilog(),
        formatter_class=_HelpFormatter,
    )
    install = sub.add_parser(
        "install",
        help="create every plugin's virtualenv, then exit",
        description="Create every plugin's virtualenv, then exit.",
    )
    package = sub.add_parser(
        "package",
        help="build a .difypkg from a plugin folder",
        description="Build a .difypkg from a plugin folder: every file except .venv, __pycache__ and "
        "what .difyignore (else .gitignore) excludes; the result is decoded again before it is written.",
    )
    package.add_argument("folder", metavar="DIR", help="the plugin folder (holds manifest.yaml)")
    package.add_argument(
        "-o", "--output", metavar="OUT", help="the file to write; default NAME-VERSION.difypkg beside DIR"
    )
    package_commands.add_signing(package)
    package_commands.add_commands(sub)
    for flag, dest, options in FLAGS:
        serve.add_argument(flag, dest=dest, default=None, help=_describe(dest), **options)
    install.add_argument("--plugins", dest="plugins_dir", default=None, help=_describe("plugins_dir"))
    _add_log_level(serve)
    _add_log_level(install)
    _add_log_level(package)
    return parser


def _setting_name(field: str, given: dict[str, Any]) -> str:
    """What the operator typed: the flag if one was given, else the environment variable."""
    return FLAG_OF[field] if field in given else field.upper()


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {dest: getattr(args, dest, None) for _, dest, _ in FLAGS}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_setting_name(str(e['loc'][0]), given)}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        sys.exit(f"plugin-daemon: invalid settings: {problems}")


def _log_level(args: argparse.Namespace) -> str:
    if hasattr(args, "log_level"):
        return str(args.log_level)
    level = os.environ.get("LOG_LEVEL", "info").strip().lower()
    if level not in LOG_LEVELS:
        given = os.environ["LOG_LEVEL"]
        sys.exit(f"plugin-daemon: invalid LOG_LEVEL {given!r}: use one of {', '.join(LOG_LEVELS)}")
    return level


def check_plugins_dir(path: Path) -> None:
    """A missing, unreadable or non-directory ``--plugins`` stops the start; an empty one is a warning."""
    try:
        path.stat()
    except FileNotFoundError:
        sys.exit(f"plugin-daemon: plugins directory {path} does not exist")
    except OSError as exc:  # a directory above it that cannot be searched, among others
        sys.exit(f"plugin-daemon: cannot read plugins directory {path}: {exc.strerror or exc}")
    if not path.is_dir():
        sys.exit(f"plugin-daemon: plugins directory {path} is a file, not a directory")
    try:
        with os.scandir(path) as entries:
            found = any(e.is_dir() and os.path.exists(os.path.join(e.path, "manifest.yaml")) for e in entries)
    except OSError as exc:
        sys.exit(f"plugin-daemon: cannot read plugins directory {path}: {exc.strerror or exc}")
    if not found:
        log.warning("plugins directory %s holds no plugin (no subfolder with a manifest.yaml)", path)


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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any plugin starts, so a port in use stops the start at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        resolved = exc.errno and not isinstance(exc, socket.gaierror)
        reason = os.strerror(exc.errno) if resolved else exc.strerror  # without "while attempting..."
        sys.exit(f"plugin-daemon: cannot listen on {host}:{port}: {reason or exc}")


def open_database(settings: Settings) -> Database:
    """The database, migrated; one that cannot be reached or migrated stops the start, said plainly."""
    try:
        database = Database.from_settings(settings)
    except DatabaseError as exc:
        sys.exit(f"plugin-daemon: {exc}")
    try:
        applied = database.migrate()
    except DatabaseError as exc:
        database.close()
        sys.exit(f"plugin-daemon: {exc}")
    log.info("database: %s%s", database.describe(), f" (migrated: {', '.join(applied)})" if applied else "")
    return database


def serve(settings: Settings) -> None:
    import faulthandler

    import uvicorn

    from daemon import direct, isolation
    from daemon.app import create_app
    from daemon.limits import protocol
    from daemon.shutdown import FINAL_EVENT_GRACE, DrainingServer

    # A crash below Python (a C extension's abort or segfault) would otherwise end the daemon with
    # no word in its log: every thread's Python stack goes to stderr first.
    faulthandler.enable(all_threads=True)
    try:
        check_backend(settings.validator_backend)
    except BackendUnavailable as exc:
        sys.exit(f"plugin-daemon: {exc}")
    check_plugins_dir(settings.plugins_dir)
    key = server_key(settings)
    isolation.prepare_state_dir(settings.state_dir, settings.plugin_isolation)
    isolation.harden_daemon()
    database = open_database(settings)
    sock = bind(settings.server_host, settings.server_port)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    app = create_app(settings, key, database=database)
    http = protocol(settings.server_max_header_bytes, settings.server_request_read_timeout)
    if settings.server_direct_dispatch:
        http = direct.protocol(http, app.state.direct)
    loop = settings.event_loop.value
    config = uvicorn.Config(
        app,
        loop=loop,
        http=http,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=FINAL_EVENT_GRACE,
        timeout_keep_alive=settings.server_keep_alive_timeout,
        limit_concurrency=settings.server_max_connections,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    server = DrainingServer(config, app.state.daemon.drain)
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # uvicorn's status for a start-up failure; it has logged why


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
        level=_log_level(args).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "install":
        plugins = Path(args.plugins_dir or os.environ.get("PLUGINS_DIR", "plugins"))
        check_plugins_dir(plugins)
        try:
            sys.exit(asyncio.run(_install(plugins)))
        except ManifestError as exc:
            sys.exit(f"plugin-daemon: {exc}")
    if args.command in package_commands.COMMANDS:
        sys.exit(package_commands.run(args))
    serve(_settings(args))
