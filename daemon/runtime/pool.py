"""Supervision: a plugin's instances, kept alive with backoff; least-busy routing.

A :class:`PluginPool` installs its plugin, then runs one supervisor task per instance
slot. A supervisor starts a connection over a fresh transport, watches it, and starts
another after it ends, waiting ``0.25 * 2**(failures-1)`` s (at most
``PLUGIN_RESTART_BACKOFF_MAX``). Anything a start raises is a failed start: logged,
counted and retried; nothing ends a supervisor but the daemon stopping.

After ``PLUGIN_MAX_START_FAILURES`` failed starts in a row (or a failed install), the
plugin is ``failed``: ``GET /plugins`` shows the error and the last lines of its stderr,
and invocations are refused at once instead of waiting for readiness. Retries go on
with backoff, and the first instance that becomes ready makes the plugin ``ready`` again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import isolation, metrics
from daemon.config import Settings
from daemon.install import InstallError, InstallProgress, ensure_venv
from daemon.manifest import PluginSpec
from daemon.resources.monitor import InstanceResources, limit_for
from daemon.runtime.backwards import BackwardsServices
from daemon.runtime.connection import Connection, InstanceStartError, PluginUnavailable
from daemon.runtime.process import ProcessTransport
from daemon.runtime.tcp import RemoteDebugging, RemotePlugin, describe_providers
from daemon.runtime.tenants import TenantPools
from daemon.wire import Codec

if TYPE_CHECKING:
    from daemon.installs.runtimes import Installations

log = logging.getLogger("daemon.runtime")

HEALTHY_AFTER = 30.0  # an instance that ran this long resets its slot's backoff


def process_connection(
    spec: PluginSpec,
    index: int,
    *,
    python: Path,
    settings: Settings,
    codec: Codec,
    services: BackwardsServices,
    loop: asyncio.AbstractEventLoop,
    drop_privileges: Sequence[str] = (),
) -> Connection:
    """An instance that is a local child process (``drop_privileges``: setpriv options)."""
    transport = ProcessTransport(
        spec,
        f"{spec.id}#{index}",
        python=python,
        max_line_bytes=settings.plugin_max_line_bytes,
        loop=loop,
        drop_privileges=drop_privileges,
        resources=InstanceResources(spec.id, index, spec.memory, settings),
    )
    return Connection(spec, index, transport, settings=settings, codec=codec, services=services, loop=loop)


class PluginPool:
    """A plugin's instances: installs it, keeps ``PLUGIN_INSTANCES`` alive, routes to them."""

    def __init__(
        self,
        spec: PluginSpec,
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        instance_factory: Callable[..., Connection] = process_connection,
    ) -> None:
        self.spec = spec
        self._settings = settings
        self._codec = codec
        self._services = services
        self._factory = instance_factory
        self.status = "installing"
        self.error: str | None = None
        self.stderr: list[str] = []  # the last stderr lines of the last failed start
        self.restarts = 0
        self.install = InstallProgress()
        self.isolation: isolation.Isolation | None = None  # decided once installed
        self.start_failures = 0  # in a row, over every slot
        self.instances: list[Connection | None] = [None] * settings.plugin_instances
        self._changed = asyncio.Condition()
        self._stopping = False
        metrics.register_plugin(spec.id)

    def _delay(self, failures: int) -> float:
        return min(self._settings.plugin_restart_backoff_max, 0.25 * 2 ** max(0, failures - 1))

    async def run(self) -> None:
        """Install (retried with backoff), then supervise every instance slot until cancelled."""
        failures = 0
        while True:
            try:
                python = await ensure_venv(self.spec, self._settings.python_interpreter_path, self.install)
                self.isolation = await asyncio.to_thread(
                    isolation.decide,
                    self.spec.id,
                    self.spec.path,
                    self.spec.entrypoint,
                    python,
                    self._settings.plugin_isolation,
                    self._settings.plugin_uid_base,
                )
                break
            except Exception as exc:
                failures += 1
                known = (InstallError, isolation.IsolationError)
                message = str(exc) if isinstance(exc, known) else f"install failed: {exc!r}"
                if isinstance(exc, isolation.IsolationError):
                    log.error("%s", message)
                else:
                    log.error("plugin %s cannot be installed: %s", self.spec.id, message)
                await self._set_status("failed", message)
                delay = self._delay(failures)
                log.warning("plugin %s: retrying the install in %.2f s", self.spec.id, delay)
                await asyncio.sleep(delay)
        await self._set_status("starting")
        async with asyncio.TaskGroup() as tasks:
            for slot in range(len(self.instances)):
                tasks.create_task(self._supervise(slot, python))

    async def _supervise(self, slot: int, python: Path) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            instance: Connection | None = None
            try:
                instance = self._factory(
                    self.spec,
                    slot,
                    python=python,
                    settings=self._settings,
                    codec=self._codec,
                    services=self._services,
                    loop=loop,
                    drop_privileges=self.isolation.setpriv_args() if self.isolation else (),
                )
                self.instances[slot] = instance
                await instance.start()
            except asyncio.CancelledError:
                if instance is not None:
                    instance.stop()
                raise
            except Exception as exc:  # any failure to start is a failed start, never the end
                if isinstance(exc, InstanceStartError):
                    message = str(exc)
                    log.error("%s", message)
                else:
                    message = f"plugin {self.spec.id}#{slot} failed to start: {exc!r}"
                    log.exception("%s", message)
                if instance is not None:
                    instance.kill("failed to start")
                failures += 1
                await self._start_failed(instance, message)
            else:
                self.start_failures = 0
                await self._set_status("ready", None)
                try:
                    await instance.watch()
                finally:
                    if self._stopping or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        instance.stop()
                healthy_for = time.monotonic() - instance.started_at
                failures = 1 if healthy_for > HEALTHY_AFTER else failures + 1
            self.instances[slot] = None
            if self._stopping:
                break
            await self._set_status(self._aggregate_status())
            self.restarts += 1
            metrics.instance_restarts.labels(self.spec.id).inc()
            delay = self._delay(failures)
            log.warning("plugin %s: restarting slot %d in %.2f s", self.spec.id, slot, delay)
            await asyncio.sleep(delay)

    async def _start_failed(self, instance: Connection | None, message: str) -> None:
        self.start_failures += 1
        tail = getattr(getattr(instance, "transport", None), "stderr", None)
        if tail is not None:
            self.stderr = await tail.last_lines()
        if self.start_failures >= self._settings.plugin_max_start_failures and self.status != "failed":
            log.error(
                "plugin %s: failed (%d failed starts in a row); invocations are refused until it starts",
                self.spec.id,
                self.start_failures,
            )
        await self._set_status(self._aggregate_status(), message)

    def _aggregate_status(self) -> str:
        if any(i is not None and i.ready for i in self.instances):
            return "ready"
        if self.start_failures >= self._settings.plugin_max_start_failures:
            return "failed"
        return "starting"

    async def _set_status(self, status: str, error: str | None = None) -> None:
        async with self._changed:
            self.status = status
            if error is not None or status == "ready":
                self.error = error
            if status == "ready":
                self.stderr = []
            self._changed.notify_all()

    async def installed(self) -> None:
        """Return once the plugin is installed (its venv made and its isolation decided)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.isolation is not None)

    def ready_instances(self) -> list[Connection]:
        return [i for i in self.instances if i is not None and i.ready]

    async def acquire(self, timeout: float) -> Connection:
        """The least busy ready instance, waiting up to ``timeout`` for one (not when failed)."""

        ready = self.ready_instances()
        if ready and not self._stopping:
            # The common case: no lock, no waiter, no timer.
            return self._reserve(ready)

        def available() -> bool:
            return bool(self.ready_instances()) or self.status == "failed" or self._stopping

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(available), timeout)
            except TimeoutError:
                raise PluginUnavailable(
                    f"plugin {self.spec.id} has no ready instance after {timeout:g} s"
                    + (f" (last error: {self.error})" if self.error else "")
                ) from None
        ready = self.ready_instances()
        if not ready:
            raise PluginUnavailable(f"plugin {self.spec.id} is unavailable: {self.error or self.status}")
        return self._reserve(ready)

    @staticmethod
    def _reserve(ready: list[Connection]) -> Connection:
        chosen = min(ready, key=lambda instance: instance.load) if len(ready) > 1 else ready[0]
        chosen.reserved += 1  # counted until its session is registered
        return chosen

    def stop(self) -> None:
        self._stopping = True
        for instance in self.instances:
            if instance is not None:
                instance.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "plugin_id": self.spec.id,
            "version": self.spec.version,
            "status": self.status,
            "error": self.error,
            "stderr": self.stderr if self.status == "failed" else [],
            "restarts": self.restarts,
            "install": self.install.describe(),
            "isolation": self.isolation.describe() if self.isolation is not None else None,
            "memory_limit": limit_for(self.spec.id, self.spec.memory, self._settings).describe(),
            "instances": [
                {
                    "index": i.index,
                    "pid": i.pid,
                    "state": i.state.value,
                    "sessions": len(i.sessions),
                    "backwards_calls": i.backwards.active,
                    **(i.resources.describe() if i.resources is not None else {}),
                }
                for i in self.instances
                if i is not None
            ],
            "providers": describe_providers(self.spec),
        }


class Runtime:
    """Every plugin pool of one daemon process."""

    def __init__(
        self,
        specs: list[PluginSpec],
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        load_errors: Mapping[str, str] | None = None,
    ) -> None:
        self.pools: dict[str, PluginPool] = {}
        self.load_errors = dict(load_errors or {})
        for spec in specs:
            if spec.id in self.pools:
                self.load_errors[str(spec.path)] = f"duplicate plugin id {spec.id}"
                continue
            self.pools[spec.id] = PluginPool(spec, settings=settings, codec=codec, services=services)
        self._tasks: list[asyncio.Task[None]] = []
        self.tenants = TenantPools(settings=settings, codec=codec, services=services)
        self.remote = (
            RemoteDebugging(settings=settings, codec=codec, services=services)
            if settings.plugin_remote_installing_enabled
            else None
        )
        self.installs: Installations | None = None  # plugins installed through the API, once attached

    def pool_for(self, plugin_id: str, tenant_id: str) -> PluginPool | RemotePlugin | None:
        """What serves ``plugin_id`` to ``tenant_id``: its remote-debug connection first, then the
        plugin it installed, then the plugins directory's. Memory only: it runs on every request."""
        remote = self.remote.for_tenant(tenant_id).get(plugin_id) if self.remote is not None else None
        if remote is not None:
            return remote
        if self.installs is not None:
            installed = self.installs.pool_for(plugin_id, tenant_id)
            if installed is not None:
                return installed
        pool = self.pools.get(plugin_id)
        if pool is not None and self.tenants.applies(plugin_id):
            return self.tenants.pool(pool, tenant_id)  # type: ignore[return-value]
        return pool

    async def resolve(self, plugin_id: str, tenant_id: str) -> PluginPool | RemotePlugin | None:
        """:meth:`pool_for`, after reading the tenant's installations again (a dispatch miss)."""
        if self.installs is not None:
            installed = await self.installs.resolve(plugin_id, tenant_id)
            if installed is not None:
                return installed
        return self.pool_for(plugin_id, tenant_id)

    def all_pools(self) -> Iterator[PluginPool]:
        """The plugins directory's pools, then the installed runtimes' (not the per-tenant ones)."""
        yield from self.pools.values()
        if self.installs is not None:
            yield from self.installs.pools()

    def describe(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Every local plugin, the installed runtimes, and the remote ones of ``tenant_id`` (of
        every tenant if None)."""
        described = [pool.describe() for pool in self.pools.values()]
        for entry in described:
            if self.tenants.applies(entry["plugin_id"]):
                entry["tenant_pools"] = self.tenants.describe(entry["plugin_id"])
        if self.installs is not None:
            described += self.installs.describe()
        if self.remote is not None:
            tenants = [tenant_id] if tenant_id is not None else list(self.remote.plugins)
            for tenant in tenants:
                described += [plugin.describe() for plugin in self.remote.for_tenant(tenant).values()]
        return described

    def instance_states(self) -> Iterator[tuple[str, int | str, bool, bool, int]]:
        """(plugin id, slot, up, ready, bytes queued for callers) per slot, for metrics. An
        installed runtime's slot is named ``<version>#<slot>``: two versions run during an upgrade."""
        named = [(pool, None) for pool in self.pools.values()]
        named += [(pool, pool.spec.version) for pool in (self.installs.pools() if self.installs else ())]
        for pool, version in named:
            for slot, instance in enumerate(pool.instances):
                name = slot if version is None else f"{version}#{slot}"
                if instance is None:
                    yield pool.spec.id, name, False, False, 0
                    continue
                queued = sum(s.stream.buffered_bytes for s in list(instance.sessions.values()))
                yield pool.spec.id, name, not instance.exited.done(), instance.ready, queued

    async def start(self) -> None:
        if self.remote is not None:
            await self.remote.start()
        self._tasks = [
            asyncio.create_task(pool.run(), name=f"pool {plugin_id}")
            for plugin_id, pool in self.pools.items()
        ]
        self.tenants.start()
        if self.installs is not None:
            await self.installs.start()

    async def stop(self) -> None:
        if self.remote is not None:
            await self.remote.stop()
        if self.installs is not None:
            await self.installs.stop()
        await self.tenants.stop()
        for pool in self.pools.values():
            pool.stop()
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for plugin_id, result in zip(self.pools, results, strict=False):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("plugin %s: supervisor ended with %r", plugin_id, result)
        # Give reader threads a moment to report the deaths they caused.
        waits = [i.exited for p in self.pools.values() for i in p.instances if i is not None]
        if waits:
            await asyncio.wait(waits, timeout=5)
