"""An instance per tenant, for operators who need tenants apart inside a plugin (opt-in).

One plugin process serves every tenant's sessions, and could answer one session with
another's id or keep data between them. For the plugins named in
``PLUGIN_INSTANCE_PER_TENANT`` (or all, with ``true``), each tenant gets a pool of its own
(one instance), created on its first request once the plugin is installed: sessions of
tenant A never share a process with tenant B. At most ``PLUGIN_TENANT_POOLS_MAX`` such
pools run per plugin (at the bound the least recently used idle one is stopped; if none
is idle the request gets 503), and a pool with no session for
``PLUGIN_TENANT_IDLE_TIMEOUT`` seconds is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from daemon.config import Settings
from daemon.runtime.backwards import BackwardsServices
from daemon.runtime.connection import Connection, PluginUnavailable
from daemon.wire import Codec

if TYPE_CHECKING:
    from daemon.runtime.pool import PluginPool

log = logging.getLogger("daemon.runtime")
_SHOWN = ("status", "error", "restarts", "isolation", "instances")


class _Full:
    """Stands in for a tenant's pool when every pool of the plugin is busy."""

    def __init__(self, shared: PluginPool, limit: int) -> None:
        self.spec = shared.spec
        self._limit = limit

    async def acquire(self, timeout: float) -> Connection:
        raise PluginUnavailable(
            f"plugin {self.spec.id} already runs {self._limit} tenant instances, all busy "
            "(PLUGIN_TENANT_POOLS_MAX)"
        )


class _TenantPool:
    def __init__(self, pool: PluginPool, task: asyncio.Task[None]) -> None:
        self.pool = pool
        self.task = task
        self.last_used = time.monotonic()

    @property
    def idle(self) -> bool:
        return all(i is None or i.load == 0 for i in self.pool.instances)


class TenantPools:
    """The per-tenant pools of every plugin that has them."""

    def __init__(self, *, settings: Settings, codec: Codec, services: BackwardsServices) -> None:
        value = settings.plugin_instance_per_tenant.strip()
        self._all = value.lower() in ("true", "1", "yes", "*")
        self._plugins = set() if self._all else {p.strip() for p in value.split(",") if p.strip()}
        self._settings = settings.model_copy(update={"plugin_instances": 1})
        self._codec = codec
        self._services = services
        self._max = settings.plugin_tenant_pools_max
        self._idle = settings.plugin_tenant_idle_timeout
        self._pools: dict[tuple[str, str], _TenantPool] = {}
        self._reaper: asyncio.Task[None] | None = None

    def applies(self, plugin_id: str) -> bool:
        return self._all or plugin_id in self._plugins

    def pool(self, shared: PluginPool, tenant: str) -> PluginPool | _Full:
        """``tenant``'s own pool of ``shared``'s plugin, started now if it has none."""
        from daemon.runtime.pool import PluginPool

        key = (shared.spec.id, tenant)
        found = self._pools.get(key)
        if found is None:
            mine = [k for k in self._pools if k[0] == shared.spec.id]
            if len(mine) >= self._max:
                idle = [k for k in mine if self._pools[k].idle]
                if not idle:
                    return _Full(shared, self._max)
                self._stop(min(idle, key=lambda k: self._pools[k].last_used), "to make room")
            pool = PluginPool(
                shared.spec, settings=self._settings, codec=self._codec, services=self._services
            )
            task = asyncio.get_running_loop().create_task(
                self._run(shared, pool), name=f"pool {shared.spec.id} tenant {tenant}"
            )
            found = self._pools[key] = _TenantPool(pool, task)
            log.info("plugin %s: starting an instance for tenant %s", shared.spec.id, tenant)
        found.last_used = time.monotonic()
        return found.pool

    @staticmethod
    async def _run(shared: PluginPool, pool: PluginPool) -> None:
        await shared.installed()  # one install per plugin: the shared pool's
        await pool.run()

    def _stop(self, key: tuple[str, str], why: str) -> None:
        entry = self._pools.pop(key)
        log.info("plugin %s: stopping the instance of tenant %s (%s)", key[0], key[1], why)
        entry.pool.stop()
        entry.task.cancel()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self._idle / 4, 30.0))
            now = time.monotonic()
            for key, entry in list(self._pools.items()):
                if not entry.idle:
                    entry.last_used = now  # idle time counts from the end of its last session
                elif now - entry.last_used > self._idle:
                    self._stop(key, f"idle for {self._idle:g} s")

    def start(self) -> None:
        if self._all or self._plugins:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="tenant pools")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        entries = list(self._pools.values())
        for key in list(self._pools):
            self._stop(key, "the daemon is stopping")
        for entry in entries:
            with contextlib.suppress(BaseException):
                await entry.task
        waits = [i.exited for e in entries for i in e.pool.instances if i is not None]
        if waits:
            await asyncio.wait(waits, timeout=5)

    def describe(self, plugin_id: str) -> list[dict[str, Any]]:
        return [
            {"tenant_id": tenant, **{k: v for k, v in entry.pool.describe().items() if k in _SHOWN}}
            for (plugin, tenant), entry in self._pools.items()
            if plugin == plugin_id
        ]
