"""Daemon settings: one typed object, filled from CLI flags, then env vars, then defaults.

Environment variable names follow upstream Dify's plugin daemon where it has one
(``SERVER_HOST``, ``SERVER_PORT``, ``SERVER_KEY``, ``PLUGIN_MAX_EXECUTION_TIMEOUT``,
``PYTHON_INTERPRETER_PATH``).
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon.resources import limits


class ValidatorDesign(StrEnum):
    """How a session's output variables are validated (see README: "Validator designs")."""

    OWNER = "owner"
    LOCK = "lock"
    UNSAFE = "unsafe"
    NONE = "none"  # no validation at all: the benchmarks' baseline, never a production choice


class ValidatorBackend(StrEnum):
    """The JSON Schema implementation behind every design (see README: "Validator designs")."""

    JSONSCHEMA = "jsonschema"
    JSONSCHEMA_RS = "jsonschema-rs"


class Access(StrEnum):
    """Who may read an operator endpoint (``/metrics``, ``/debug/*``)."""

    OPEN = "open"  # anyone who can reach the port
    LOOPBACK = "loopback"  # loopback clients freely, others with the server key
    KEY = "key"  # only with the server key
    OFF = "off"  # not served


class EventLoop(StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"  # the standard library's loop


class CodecName(StrEnum):
    ORJSON = "orjson"
    JSON = "json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    server_host: str = Field("127.0.0.1", description="address to bind; a non-loopback one needs SERVER_KEY")
    server_port: int = Field(5002, ge=0, le=65535, description="port to bind")
    server_key: str | None = Field(
        None,
        min_length=1,
        description="the API key callers send as X-Api-Key (default: generated, kept in STATE_DIR)",
    )
    plugins_dir: Path = Field(Path("plugins"), description="plugins directory, one plugin per subfolder")
    state_dir: Path = Field(
        Path(".daemon-state"), description="generated key and the SQLite database (when DB_TYPE is sqlite)"
    )
    validator: ValidatorDesign = Field(
        ValidatorDesign.OWNER, description="output validation design; none skips validation"
    )
    validator_backend: ValidatorBackend = Field(
        ValidatorBackend.JSONSCHEMA_RS, description="JSON Schema implementation"
    )
    codec: CodecName = Field(CodecName.ORJSON, description="JSON codec of the hot path")

    plugin_max_execution_timeout: float = Field(600.0, gt=0, description="seconds one invocation may run")
    plugin_instances: int = Field(1, ge=1, le=64, description="processes per plugin")
    plugin_ready_timeout: float = Field(
        120.0, gt=0, description="seconds to a plugin's first heartbeat, and the most a request waits for one"
    )
    plugin_liveness_timeout: float = Field(
        60.0, gt=0, description="seconds without output before a plugin instance is killed"
    )
    plugin_max_line_bytes: int = Field(
        5 * 1024 * 1024, ge=1024, description="longest plugin stdout line; a longer one fails the instance"
    )
    plugin_restart_backoff_max: float = Field(30.0, gt=0, description="cap of the restart backoff, seconds")
    plugin_max_start_failures: int = Field(
        3, ge=1, description="failed starts in a row after which the plugin is reported failed"
    )
    python_interpreter_path: str | None = Field(
        None, description="Python for plugin venvs (default: pythonX.Y on PATH, then pyenv's versions)"
    )
    event_loop: EventLoop = Field(EventLoop.UVLOOP, description="event loop: uvloop or the stdlib asyncio")
    plugin_remote_installing_enabled: bool = Field(
        True, description="accept remote-debugging plugins over TCP"
    )
    plugin_remote_installing_host: str = Field(
        "127.0.0.1", description="address of the remote-debugging listener"
    )
    plugin_remote_installing_port: int = Field(
        5003, ge=0, le=65535, description="port of the remote-debugging listener"
    )

    # What an instance may use (README: "Resource limits and the watchdog").
    plugin_memory_limit: ByteSize = Field(
        ByteSize(1024**3),
        description="resident memory per instance; 0: none unless a manifest or override sets one",
    )
    plugin_memory_limits: str = Field("", description="per-plugin overrides: author/name=SIZE,... (0: none)")
    plugin_memory_mechanism: Literal["auto", "rss"] = Field(
        "auto", description="auto: a cgroup where one can be made, else RSS sampling; rss: sampling only"
    )
    plugin_idle_cpu_share: float = Field(
        0.5, ge=0, description="share of one core an idle instance may use (0 turns the watchdog off)"
    )
    plugin_idle_cpu_seconds: float = Field(60.0, gt=0, description="for this long before it is restarted")
    plugin_resource_sample_interval: float = Field(
        5.0, gt=0, description="seconds between samples of each instance's /proc figures"
    )

    metrics_access: Access = Field(
        Access.LOOPBACK, description="who may read /metrics: open, loopback (or the key), key, off"
    )
    debug_access: Access = Field(Access.LOOPBACK, description="the same for /debug/*")
    trace_ring_spans: int = Field(20000, ge=0, description="spans kept for /debug/traces; 0 keeps none")
    trace_untraced_paths: str = Field(
        "/plugins,/health/check,/metrics",
        description="comma-separated paths never traced (polling would crowd out the traces that matter)",
    )
    trace_ring_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="estimated bytes the /debug/traces ring may hold"
    )

    session_buffer_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="per-session buffer between a plugin and a slow caller"
    )
    max_request_body_bytes: int = Field(1024 * 1024, ge=1024, description="largest request body")
    persistence_storage_max_size: int = Field(
        100 * 1024 * 1024, ge=1024, description="bytes (keys and values) one plugin may store for one tenant"
    )
    max_plugin_package_size: int = Field(
        50 * 1024 * 1024, ge=1024, description="largest .difypkg upload, packed and unpacked"
    )
    force_verifying_signature: bool = Field(True, description="refuse packages without a verified signature")
    third_party_signature_verification_enabled: bool = Field(
        False, description="trust the keys of THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS too"
    )
    third_party_signature_verification_public_keys: str = Field(
        "", description="comma-separated PEM files of RSA public keys trusted besides Dify's official one"
    )

    # Hostile clients and operator events (README: "Security" and "Limits").
    server_shutdown_drain_timeout: float = Field(
        30.0, ge=0, description="seconds sessions may finish after SIGTERM before they are ended"
    )
    server_max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request head (431 above)")
    server_direct_dispatch: bool = Field(
        True,
        description="serve dispatch requests from the HTTP protocol directly, not through ASGI "
        "(the same answers at a fraction of the CPU; false sends them through the ASGI app)",
    )
    server_request_read_timeout: float = Field(
        30.0, gt=0, description="seconds to read a request head and body (408 after)"
    )
    server_keep_alive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    server_max_connections: int = Field(1000, ge=1, description="connections at once (503 above)")
    client_write_timeout: float = Field(
        60.0, gt=0, description="seconds a client that stops reading keeps its session"
    )
    session_buffer_total_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="bytes buffered across every session's stream"
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1", description="proxies whose X-Forwarded-For is believed (uvicorn's variable)"
    )
    plugin_isolation: Literal["auto", "none", "uid"] = Field(
        "auto",
        description="auto: as root, each plugin under its own uid when that uid can run it; "
        "uid: always (a plugin it cannot run fails); none: the daemon's uid",
    )
    plugin_instance_per_tenant: str = Field(
        "", description="true, or author/name,...: plugins that get an instance of their own per tenant"
    )
    plugin_tenant_pools_max: int = Field(32, ge=1, description="tenant instances per plugin, at most")
    plugin_tenant_idle_timeout: float = Field(
        300.0, gt=0, description="seconds a tenant's instance may go without a session before it stops"
    )
    plugin_uid_base: int = Field(200_000, ge=1000, description="first uid of plugins' own uids")
    plugin_install_timeout: float = Field(
        15.0, gt=0, description="minutes an install may take to serve before its task fails (upstream's)"
    )
    plugin_installed_path: Path | None = Field(
        None,
        description="where installed plugins are extracted and run (default STATE_DIR/runtimes; "
        "outside STATE_DIR, which is 0700 as root, for plugins to run under their own uid)",
    )
    plugin_installations_reconcile_interval: float = Field(
        2.0, gt=0, description="seconds between reads of the installations other daemons made"
    )

    # The database (README: "State and the database"); the names and defaults are upstream's.
    db_type: Literal["sqlite", "postgresql"] | None = Field(
        None, description="sqlite (a file in STATE_DIR) or postgresql; unset: postgresql when DB_HOST is set"
    )
    db_host: str | None = Field(None, min_length=1, description="PostgreSQL server's host")
    db_port: int = Field(5432, ge=1, le=65535, description="PostgreSQL server's port")
    db_username: str = Field("postgres", min_length=1, description="PostgreSQL user")
    db_password: str | None = Field(None, description="PostgreSQL password (never logged)")
    db_database: str = Field(
        "dify_plugin", min_length=1, description="PostgreSQL database, shared by the daemons that use it"
    )
    db_default_database: str = Field(
        "postgres", min_length=1, description="PostgreSQL database used to create DB_DATABASE when missing"
    )
    db_ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "disable", description="libpq sslmode of the PostgreSQL connection"
    )
    db_max_open_conns: int = Field(30, ge=1, le=1000, description="PostgreSQL connections, at most")
    db_max_idle_conns: int = Field(10, ge=0, description="PostgreSQL connections kept open when idle")
    db_conn_max_lifetime: int = Field(
        3600, ge=1, description="seconds before a PostgreSQL connection is replaced"
    )

    @model_validator(mode="after")
    def _database(self) -> Settings:
        if self.db_type == "postgresql" and not self.db_host:
            message = "DB_TYPE=postgresql needs DB_HOST (the PostgreSQL server's host)"
            raise PydanticCustomError("db_host", message)
        return self

    @property
    def database_type(self) -> str:
        """``sqlite`` or ``postgresql``: DB_TYPE, else postgresql exactly when DB_HOST is set."""
        return self.db_type or ("postgresql" if self.db_host else "sqlite")

    @property
    def database_file(self) -> Path:
        return self.state_dir / "state.sqlite3"

    @field_validator("plugin_memory_limits")
    @classmethod
    def _overrides(cls, value: str) -> str:
        limits.parse_overrides(value)  # raises with what is wrong
        return value

    @model_validator(mode="after")
    def _read_signature_keys(self) -> Settings:
        """Read the key files once, now: a bad one stops the daemon at start, named."""
        _ = self.signature_keys
        return self

    @cached_property
    def signature_keys(self) -> tuple[Any, ...]:
        """The RSA public keys a package signature may verify under (README: "Signatures")."""
        from daemon.packages import signature

        files = signature.key_files(self.third_party_signature_verification_public_keys)
        enabled = self.third_party_signature_verification_enabled
        try:
            return signature.trusted_keys(files if enabled else ())
        except signature.KeyFileError as exc:
            raise ValueError(f"THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS: {exc}") from None

    @property
    def memory_limit_overrides(self) -> dict[str, int]:
        return limits.parse_overrides(self.plugin_memory_limits)

    @property
    def runtimes_dir(self) -> Path:
        return self.plugin_installed_path or self.state_dir / "runtimes"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "server.key"

    @property
    def legacy_storage_file(self) -> Path:
        """Where older daemons kept plugin storage; imported into the database once."""
        return self.state_dir / "storage.sqlite3"
