"""Remote debugging: plugins that connect over TCP, as the SDK's ``INSTALL_METHOD=remote`` does.

A plugin author asks for a key (``POST /plugin/{tenant_id}/debugging/key``) and runs the
plugin on their machine with ``REMOTE_INSTALL_URL=host:port`` (or ``_HOST``/``_PORT``) and
``REMOTE_INSTALL_KEY``. The SDK connects and sends, one JSON line each: a handshake with the
key, its manifest, its tool declarations, its assets in base64 chunks, then ``end``. From then
on the socket carries the same lines as a local plugin's stdin/stdout.

A wrong key is refused (the socket gets a one-line reason and is closed) and logged. A plugin
that registers is served to its key's tenant only, under its declared ``author/name``, for
as long as it stays connected; a disconnect ends its sessions at once with
``ConnectionClosedError``. A second connection of the same plugin for the same tenant
replaces the first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.manifest import ManifestError, PluginSpec, ProviderSpec, ToolSpec
from daemon.runtime.backwards import BackwardsServices
from daemon.runtime.connection import Connection, InstanceStartError, PluginUnavailable
from daemon.validation import OutputSchema, SchemaDeclarationError
from daemon.wire import Codec

log = logging.getLogger("daemon.runtime")

CONNECTION_CLOSED = "ConnectionClosedError"  # upstream's error type for a remote plugin gone
REGISTRATION_LINE_BYTES = 4 * 1024 * 1024  # a declaration or an asset chunk
MAX_CONNECTIONS = 64  # registering and registered, at once (upstream bounds them too)
REGISTRATION_TIMEOUT = 30.0  # seconds from connect to ``end`` (upstream: 10 s to the handshake)
MAX_ASSET_BYTES = 50 * 1024 * 1024  # as upstream
MAX_ASSETS = 10_000  # files, as many as a package may hold (each costs far more than its bytes)
READ_CHUNK = 256 * 1024


class DebuggingKeys:
    """One key per tenant, made on first request and kept while the daemon runs."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, str] = {}
        self._by_key: dict[str, str] = {}

    def key_for(self, tenant_id: str) -> str:
        key = self._by_tenant.get(tenant_id)
        if key is None:
            key = secrets.token_urlsafe(24)
            self._by_tenant[tenant_id] = key
            self._by_key[key] = tenant_id
        return key

    def tenant_of(self, key: str) -> str | None:
        return self._by_key.get(key)


class SocketTransport:
    """A connected plugin's socket, after registration: lines in, frames out, an end cause."""

    death_error_type = CONNECTION_CLOSED

    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        early: list[bytes],
        *,
        max_line_bytes: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.pid: int | None = None
        self.last_output = time.monotonic()
        self.exited: asyncio.Future[str] = loop.create_future()
        self._reader = reader
        self._writer = writer
        self._early = early  # protocol lines that arrived with the registration
        self._max_line = max_line_bytes
        self._kill_reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def kill_reason(self) -> str | None:
        return self._kill_reason

    async def start(self, on_lines: Callable[[list[bytes]], None], on_close: Callable[[str], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read(on_lines, on_close))

    async def _read(self, on_lines: Callable[[list[bytes]], None], on_close: Callable[[str], None]) -> None:
        reason = "disconnected"
        pending = b""
        try:
            if self._early:
                on_lines(self._early)
            while chunk := await self._reader.read(READ_CHUNK):
                self.last_output = time.monotonic()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > self._max_line or any(len(line) > self._max_line for line in lines):
                    reason = f"sent a line longer than the {self._max_line} byte limit"
                    break
                on_lines(lines)
        except (ConnectionError, OSError) as exc:
            reason = f"disconnected ({exc.__class__.__name__})"
        except Exception as exc:  # a bug here must not leave sessions hanging
            reason = f"reader failed: {exc!r}"
            log.exception("plugin %s: reader failed", self.name)
        finally:
            self._writer.transport.abort()
            outcome = self._kill_reason or reason
            try:
                on_close(outcome)
            finally:
                if not self.exited.done():
                    self.exited.set_result(outcome)

    async def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()  # waits while the plugin is not reading

    def kill(self, reason: str) -> None:
        if self._kill_reason is None:
            self._kill_reason = reason
        self._writer.transport.abort()


def spec_from_declaration(
    manifest: Mapping[str, Any],
    tool_providers: list[Any],
    settings: Settings,
    where: str,
    *,
    other_providers: bool = False,
) -> PluginSpec:
    """The plugin as its SDK declared it: what a local plugin's YAML files would say."""
    path = Path(where)

    def text(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{where}: {what} missing")
        return value

    # The SDK sends what the author's YAML says: any JSON, so each level's type is checked.
    def mapping(value: Any, what: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where}: {what} must be an object")
        return value

    def sequence(value: Any, what: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ManifestError(f"{where}: {what} must be a list")
        return value

    providers: dict[str, ProviderSpec] = {}
    for provider in tool_providers:
        if not isinstance(provider, Mapping):
            raise ManifestError(f"{where}: a tool provider declaration must be an object")
        name = text(
            mapping(provider.get("identity"), "provider identity").get("name"), "provider identity.name"
        )
        tools: dict[str, ToolSpec] = {}
        for tool in sequence(provider.get("tools"), f"provider {name}: tools"):
            if not isinstance(tool, Mapping):
                raise ManifestError(f"{where}: a tool declaration must be an object")
            tool_name = text(mapping(tool.get("identity"), "tool identity").get("name"), "tool identity.name")
            schema = tool.get("output_schema")
            compiled = None
            if isinstance(schema, Mapping) and schema:
                try:
                    compiled = OutputSchema(schema, settings.validator_backend)
                except SchemaDeclarationError as exc:
                    raise ManifestError(f"{where}: tool {tool_name}: {exc}") from None
            declared = sequence(tool.get("parameters"), f"tool {tool_name}: parameters")
            parameters = tuple(p for p in declared if isinstance(p, Mapping))
            tools[tool_name] = ToolSpec(tool_name, parameters, compiled)
        providers[name] = ProviderSpec(name, tools)
    if not providers and not other_providers:
        raise ManifestError(
            f"{where}: declares no providers (tool, model, agent strategy, datasource, trigger or endpoint)"
        )
    runner = mapping(mapping(manifest.get("meta"), "meta").get("runner"), "meta.runner")
    return PluginSpec(
        path=path,
        author=text(manifest.get("author"), "author"),
        name=text(manifest.get("name"), "name"),
        version=str(manifest.get("version") or "0.0.0"),
        python_version=str(runner.get("version") or ""),
        entrypoint=str(runner.get("entrypoint") or ""),
        providers=providers,
    )


def describe_providers(spec: PluginSpec) -> dict[str, Any]:
    """A plugin's tools as ``GET /plugins`` shows them."""
    return {
        name: {
            "tools": {
                tool.name: {"output_schema": tool.output_schema is not None}
                for tool in provider.tools.values()
            }
        }
        for name, provider in spec.providers.items()
    }


class RemotePlugin:
    """A connected plugin, served to one tenant: the pool interface over one connection."""

    def __init__(
        self,
        tenant_id: str,
        connection: Connection,
        peer: str,
        assets: dict[str, bytes],
        declarations: Mapping[str, Any] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.spec = connection.spec
        self.connection = connection
        self.peer = peer
        self.assets = assets
        # What the SDK declared (manifest, tools, models, agent_strategies), for the management routes.
        self.declarations: Mapping[str, Any] = declarations or {}
        self.connected_at = time.time()
        self.instances: list[Connection | None] = [connection]
        self.restarts = 0

    @property
    def status(self) -> str:
        return "ready" if self.connection.ready else "starting"

    async def acquire(self, timeout: float) -> Connection:
        if not self.connection.ready:
            raise PluginUnavailable(f"remote plugin {self.spec.id} is not connected")
        self.connection.reserved += 1
        return self.connection

    def describe(self) -> dict[str, Any]:
        c = self.connection
        return {
            "plugin_id": self.spec.id,
            "version": self.spec.version,
            "status": self.status,
            "error": None,
            "stderr": [],
            "restarts": 0,
            "remote": {"tenant_id": self.tenant_id, "peer": self.peer},
            "instances": [{"index": 0, "pid": None, "state": c.state.value, "sessions": len(c.sessions)}],
            "providers": describe_providers(self.spec),
        }


class RegistrationError(Exception):
    """The connection is refused; the message is sent to the plugin and logged."""


class RemoteDebugging:
    """The TCP listener and every remote plugin connected to it, by tenant."""

    def __init__(self, *, settings: Settings, codec: Codec, services: BackwardsServices) -> None:
        self._settings = settings
        self._codec = codec
        self._services = services
        self.keys = DebuggingKeys()
        self.plugins: dict[str, dict[str, RemotePlugin]] = {}  # tenant -> plugin id -> plugin
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        host, port = (
            self._settings.plugin_remote_installing_host,
            self._settings.plugin_remote_installing_port,
        )
        try:
            self._server = await asyncio.start_server(self._accept, host, port, limit=REGISTRATION_LINE_BYTES)
        except OSError as exc:
            log.error("remote debugging is off: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            return
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("remote debugging: listening on %s:%d", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for tenant in self.plugins.values():
            for plugin in tenant.values():
                plugin.connection.stop()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def for_tenant(self, tenant_id: str) -> dict[str, RemotePlugin]:
        return self.plugins.get(tenant_id, {})

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            log.warning(
                "remote plugin from %s refused: %d connections already",
                writer.get_extra_info("peername"),
                MAX_CONNECTIONS,
            )
            writer.write(b"server is busy now, please try again later\n")
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        try:
            async with asyncio.timeout(REGISTRATION_TIMEOUT):
                tenant, spec, assets, early, declared = await self._register(reader, peer)
        except Exception as exc:  # whatever the plugin sent, it gets a reason and the socket is closed
            if not isinstance(
                exc, (RegistrationError, ManifestError, TimeoutError, ConnectionError, ValueError)
            ):
                log.exception("remote plugin from %s: registration failed", peer)
            reason = str(exc) or ("registration timed out" if isinstance(exc, TimeoutError) else repr(exc))
            log.warning("remote plugin from %s refused: %s", peer, reason)
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(f"{reason}\n".encode())
                await asyncio.wait_for(writer.drain(), 2)
            writer.transport.abort()
            return
        loop = asyncio.get_running_loop()
        transport = SocketTransport(
            f"{spec.id}@{tenant}",
            reader,
            writer,
            early,
            max_line_bytes=self._settings.plugin_max_line_bytes,
            loop=loop,
        )
        connection = Connection(
            spec, 0, transport, settings=self._settings, codec=self._codec, services=self._services, loop=loop
        )
        try:
            await connection.start()
        except InstanceStartError as exc:
            log.warning("remote plugin %s from %s: %s", spec.id, peer, exc)
            return
        plugin = RemotePlugin(tenant, connection, peer, assets, declared)
        previous = self.plugins.setdefault(tenant, {}).get(spec.id)
        self.plugins[tenant][spec.id] = plugin
        if previous is not None:
            previous.connection.kill("replaced by a new connection of the same plugin")
        log.info("remote plugin %s connected from %s for tenant %s", spec.id, peer, tenant)
        try:
            await connection.watch()
        finally:
            if self.plugins.get(tenant, {}).get(spec.id) is plugin:
                del self.plugins[tenant][spec.id]
                if not self.plugins[tenant]:
                    del self.plugins[tenant]
            if not transport.exited.done():
                connection.stop()  # shutting down: end the sessions now
        log.info(
            "remote plugin %s from %s for tenant %s: %s", spec.id, peer, tenant, transport.exited.result()
        )

    async def _register(
        self, reader: asyncio.StreamReader, peer: str
    ) -> tuple[str, PluginSpec, dict[str, bytes], list[bytes], dict[str, Any]]:
        """Handshake, declarations, assets, ``end``; the protocol lines that came meanwhile."""
        tenant: str | None = None
        manifest: Mapping[str, Any] | None = None
        tools: list[Any] = []
        assets: dict[str, bytearray] = {}
        asset_bytes = 0
        early: list[bytes] = []
        declared: dict[str, Any] = {}  # the other providers (models, ...), for the management routes
        while True:
            line = await self._line(reader)
            if not line.strip():
                continue
            message = self._codec.loads(line)
            if not isinstance(message, dict):
                raise RegistrationError("handshake failed, invalid handshake message")
            kind, data = message.get("type"), message.get("data")
            if tenant is None:
                key = data.get("key") if kind == "handshake" and isinstance(data, dict) else None
                tenant = self.keys.tenant_of(key) if isinstance(key, str) else None
                if tenant is None:
                    raise RegistrationError("handshake failed, invalid key")
                continue
            if kind is None and "event" in message:
                if len(early) >= 64:
                    raise RegistrationError("too many protocol lines before the registration ended")
                early.append(line)
            elif kind == "manifest_declaration" and isinstance(data, dict):
                manifest = data
            elif kind == "tool_declaration" and isinstance(data, list):
                tools = data
            elif kind == "asset_chunk" and isinstance(data, dict):
                chunk = base64.b64decode(str(data.get("data") or ""), validate=True)
                asset_bytes += len(chunk)
                if asset_bytes > MAX_ASSET_BYTES:
                    raise RegistrationError("assets too large, at most 50MB")
                filename = str(data.get("filename"))
                if filename not in assets and len(assets) >= MAX_ASSETS:
                    raise RegistrationError(f"too many assets, at most {MAX_ASSETS} files")
                assets.setdefault(filename, bytearray()).extend(chunk)
            elif kind == "end":
                if manifest is None:
                    raise RegistrationError("no manifest declaration before end")
                where = f"remote plugin from {peer}"
                spec = spec_from_declaration(
                    manifest, tools, self._settings, where, other_providers=any(declared.values())
                )
                declared.update(manifest=manifest, tools=tools)
                return tenant, spec, {name: bytes(data) for name, data in assets.items()}, early, declared
            elif kind == "model_declaration" and isinstance(data, list):
                declared["models"] = data
            elif kind == "agent_strategy_declaration" and isinstance(data, list):
                declared["agent_strategies"] = data
            elif kind == "endpoint_declaration" and isinstance(data, list):
                declared["endpoints"] = data
            elif kind == "datasource_declaration" and isinstance(data, list):
                declared["datasources"] = data
            elif kind == "trigger_declaration" and isinstance(data, list):
                declared["triggers"] = data

    async def _line(self, reader: asyncio.StreamReader) -> bytes:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ConnectionError("disconnected during registration") from None
        except asyncio.LimitOverrunError:
            raise RegistrationError("registration line too long") from None
        return line
