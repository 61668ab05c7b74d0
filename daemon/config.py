"""Daemon settings: one typed object, filled from CLI flags, then env vars, then defaults.

Environment variable names follow upstream Dify's plugin daemon where it has one
(``SERVER_HOST``, ``SERVER_PORT``, ``SERVER_KEY``, ``PLUGIN_MAX_EXECUTION_TIMEOUT``,
``PYTHON_INTERPRETER_PATH``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, field_validator
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


class CodecName(StrEnum):
    ORJSON = "orjson"
    JSON = "json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    server_host: str = "127.0.0.1"
    server_port: int = Field(5002, ge=0, le=65535)
    server_key: str | None = Field(None, min_length=1)
    plugins_dir: Path = Path("plugins")
    state_dir: Path = Path(".daemon-state")
    validator: ValidatorDesign = ValidatorDesign.OWNER
    validator_backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA
    codec: CodecName = CodecName.ORJSON

    plugin_max_execution_timeout: float = Field(600.0, gt=0)
    plugin_instances: int = Field(1, ge=1, le=64)
    plugin_ready_timeout: float = Field(120.0, gt=0)
    plugin_liveness_timeout: float = Field(60.0, gt=0)
    plugin_max_line_bytes: int = Field(5 * 1024 * 1024, ge=1024)
    plugin_restart_backoff_max: float = Field(30.0, gt=0)
    python_interpreter_path: str | None = None

    # What an instance may use (README: "Resource limits and the watchdog").
    plugin_memory_limit: ByteSize = ByteSize(1024**3)  # 0: no limit unless a manifest or override sets one
    plugin_memory_limits: str = ""  # author/name=SIZE,... (0: none)
    plugin_memory_mechanism: Literal["auto", "rss"] = "auto"
    plugin_idle_cpu_share: float = Field(0.5, ge=0)  # of one core; 0 turns the watchdog off
    plugin_idle_cpu_seconds: float = Field(60.0, gt=0)
    plugin_resource_sample_interval: float = Field(5.0, gt=0)

    metrics_access: Access = Access.LOOPBACK
    debug_access: Access = Access.LOOPBACK
    trace_ring_spans: int = Field(20000, ge=0)

    session_buffer_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_request_body_bytes: int = Field(1024 * 1024, ge=1024)

    @field_validator("plugin_memory_limits")
    @classmethod
    def _overrides(cls, value: str) -> str:
        limits.parse_overrides(value)  # raises with what is wrong
        return value

    @property
    def memory_limit_overrides(self) -> dict[str, int]:
        return limits.parse_overrides(self.plugin_memory_limits)

    @property
    def key_file(self) -> Path:
        return self.state_dir / "server.key"

    @property
    def storage_file(self) -> Path:
        return self.state_dir / "storage.sqlite3"
