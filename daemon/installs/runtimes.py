"""One runtime per unique identifier, shared by every tenant that installed it.

The database says which tenant has which plugin at which ``author/name:version@checksum``;
this module keeps a copy of that in memory (dispatch reads it on every request, so it must cost
a dictionary lookup) and runs one :class:`~daemon.runtime.pool.PluginPool` per identifier that
some tenant has installed, or that an install in progress needs:

- *start*: the package's bytes are read from the database and decoded again (every limit and
  check of an upload, the checksum compared with the identifier) into
  ``<PLUGIN_INSTALLED_PATH>/<author>/<name>/<version>@<checksum>`` (default
  ``STATE_DIR/runtimes``), then the pool installs its
  virtualenv there with uv and starts its instances. A folder already extracted by an earlier
  run is used as it is, so a restart does not install again.
- *stop*: once no installation refers to it, the runtime leaves the index (new requests no
  longer reach it) and stops when its sessions in flight have ended (at most
  ``PLUGIN_MAX_EXECUTION_TIMEOUT``); then its folder is removed. Installed again before that,
  it is kept instead.

Several daemons can share one database: each runs the runtimes of every installed identifier.
A daemon reads the installations again every ``PLUGIN_INSTALLATIONS_RECONCILE_INTERVAL``
seconds (one small read of a generation counter when nothing changed), when a management route
asks about a tenant, and when a dispatch request names a plugin it does not know for that tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.installs import store
from daemon.installs.store import Installation
from daemon.manifest import load_plugin
from daemon.packages.archive import Limits, PackageError
from daemon.packages.decode import decode_into, place_of
from daemon.runtime.connection import PluginUnavailable
from daemon.runtime.pool import PluginPool

if TYPE_CHECKING:
    from daemon.config import Settings
    from daemon.runtime.backwards import BackwardsServices
    from daemon.state import Database
    from daemon.wire import Codec

log = logging.getLogger("daemon.installs")

SUCCEEDED_TASKS_KEPT = 120.0  # seconds a successful task stays readable, as upstream
RETRY_PREPARE_AFTER = 30.0  # seconds before a runtime that could not be extracted is tried again


def _expire(connection: Any, *, timeout: float) -> int:
    now = time.time()
    return store.expire_tasks(
        connection, succeeded_before=now - SUCCEEDED_TASKS_KEPT, running_before=now - timeout - 60
    )


class InstalledRuntime:
    """The runtime of one unique identifier: its folder, then its pool once the folder is there."""

    def __init__(self, identifier: str, folder: Path) -> None:
        self.identifier = identifier
        self.folder = folder
        self.pool: PluginPool | None = None
        self.error: str | None = None  # why no pool could be made (the package, its manifest)
        self.failed_at = 0.0  # when ``error`` was set (monotonic)
        self.built = asyncio.Event()  # set once ``pool`` or ``error`` is
        self.task: asyncio.Task[None] | None = None  # extracts, then supervises the pool
        self.drain: asyncio.Task[None] | None = None  # once no tenant has it: waits, stops, removes
        self.stopping = False

    @property
    def status(self) -> str:
        if self.pool is not None:
            return self.pool.status
        return "failed" if self.error is not None else "extracting"

    @property
    def busy(self) -> bool:
        return self.pool is not None and any(i is not None and i.load > 0 for i in self.pool.instances)

    def reason(self) -> str:
        """Why it is not serving, for a failed install task or a refused request."""
        if self.pool is None:
            return self.error or "still being extracted"
        reason = self.pool.error or f"plugin {self.identifier} is {self.pool.status}"
        if self.pool.stderr:
            reason += "\n" + "\n".join(self.pool.stderr[-10:])
        return reason

    async def stop(self) -> None:
        self.stopping = True
        if self.pool is not None:
            self.pool.stop()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        waits = [i.exited for i in (self.pool.instances if self.pool else []) if i is not None]
        if waits:
            await asyncio.wait(waits, timeout=5)

    def describe(self, tenants: int, draining: bool) -> dict[str, Any]:
        described = (
            self.pool.describe()
            if self.pool is not None
            else {"plugin_id": self.identifier.partition(":")[0], "status": self.status, "instances": []}
        )
        if self.error is not None:
            described["error"] = self.error
        return {
            **described,
            "unique_identifier": self.identifier,
            "tenants": tenants,
            "draining": draining,  # no tenant has it: it ends once its sessions have
        }


class Installations:
    """Every tenant's installations, in memory, and the runtimes they need."""

    def __init__(
        self,
        database: Database,
        *,
        settings: Settings,
        codec: Codec,
        services: BackwardsServices,
        limits: Limits,
    ) -> None:
        self.database = database
        self.settings = settings
        self._codec = codec
        self._services = services
        self._limits = limits
        self.root = settings.runtimes_dir
        self.index: dict[str, dict[str, Installation]] = {}  # tenant -> plugin id -> installation
        self.runtimes: dict[str, InstalledRuntime] = {}
        self.declarations: dict[str, dict[str, Any]] = {}  # identifier -> listing declaration
        self._draining: dict[str, InstalledRuntime] = {}
        self._pins: Counter[str] = Counter()  # identifiers an install in progress needs
        self._lock = asyncio.Lock()
        self._generation: int | None = None
        self._tenant_reads: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # every background task here, owned for stop()
        self._loop: asyncio.Task[None] | None = None
        self._stopped = False  # set by stop(): no runtime starts after it

    # -- what dispatch reads ----------------------------------------------------------------

    def pool_for(self, plugin_id: str, tenant: str) -> PluginPool | None:
        """The pool of the tenant's installed ``plugin_id``: two dictionary lookups, no I/O."""
        found = self.index.get(tenant, {}).get(plugin_id)
        if found is None:
            return None
        runtime = self.runtimes.get(found.unique_identifier)
        return runtime.pool if runtime is not None else None

    async def resolve(self, plugin_id: str, tenant: str) -> PluginPool | None:
        """After :meth:`pool_for` missed: read the tenant's installations again (another daemon
        may have installed it), then wait for its runtime to have a pool. None if the tenant has
        not installed ``plugin_id``; :class:`PluginUnavailable` if it cannot be served."""
        try:
            await self.refresh(tenant)
        except Exception as exc:  # the database is away: a transient outage for the caller
            log.error("installations of tenant %s cannot be read: %s", tenant, exc)
            raise PluginUnavailable(f"the installations cannot be read: {exc}") from None
        found = self.index.get(tenant, {}).get(plugin_id)
        if found is None:
            return None
        runtime = self.runtimes.get(found.unique_identifier)
        if runtime is None:
            raise PluginUnavailable(f"plugin {found.unique_identifier} has no runtime on this daemon")
        try:
            await asyncio.wait_for(runtime.built.wait(), self.settings.plugin_ready_timeout)
        except TimeoutError:
            raise PluginUnavailable(f"plugin {found.unique_identifier} is still being extracted") from None
        if runtime.pool is None:
            raise PluginUnavailable(f"plugin {found.unique_identifier} cannot run: {runtime.error}")
        return runtime.pool

    def installed(self, tenant: str) -> list[Installation]:
        return list(self.index.get(tenant, {}).values())

    def pools(self) -> Iterator[PluginPool]:
        """Every pool running here, draining ones included (metrics, the resource monitor)."""
        for runtime in [*self.runtimes.values(), *self._draining.values()]:
            if runtime.pool is not None:
                yield runtime.pool

    def describe(self) -> list[dict[str, Any]]:
        users = Counter(i.unique_identifier for rows in self.index.values() for i in rows.values())
        shown = [runtime.describe(users[identifier], False) for identifier, runtime in self.runtimes.items()]
        return shown + [runtime.describe(0, True) for runtime in self._draining.values()]

    # -- reading the database ---------------------------------------------------------------

    async def refresh(self, tenant: str | None = None) -> None:
        """Bring the index up to date with the database (one tenant's rows, or every row if the
        generation moved), then start and stop runtimes to match."""
        if tenant is not None:
            running = self._tenant_reads.get(tenant)
            if running is None:  # concurrent misses of one tenant share one read
                running = self._tenant_reads[tenant] = asyncio.ensure_future(self._refresh(tenant))
                running.add_done_callback(lambda _: self._tenant_reads.pop(tenant, None))
            await asyncio.shield(running)
            return
        await self._refresh(None)

    async def _refresh(self, tenant: str | None) -> None:
        async with self._lock:
            if tenant is None:
                generation = await self.database.run(store.generation)
                if generation == self._generation:
                    self._converge()  # nothing new; runtimes that failed to prepare are retried
                    return
                rows = await self.database.run(store.installations)
                self.index = {}
                self._generation = generation
            else:
                rows = await self.database.run(lambda c: store.installations(c, tenant))
                self.index.pop(tenant, None)
            for row in rows:
                self.index.setdefault(row.tenant_id, {})[row.plugin_id] = row
            await self._load_declarations({row.unique_identifier for row in rows})
            self._converge()

    async def _load_declarations(self, identifiers: set[str]) -> None:
        missing = identifiers - self.declarations.keys()
        if missing:
            self.declarations.update(
                await self.database.run(lambda c: store.package_declarations(c, missing))
            )

    def _converge(self) -> None:
        """Start a runtime for each identifier wanted, drain the ones no longer wanted (under the lock)."""
        if self._stopped:
            return  # an install job cancelled by stop() must not start what stop() is stopping
        wanted = {i.unique_identifier for rows in self.index.values() for i in rows.values()}
        wanted |= {identifier for identifier, count in self._pins.items() if count > 0}
        now = time.monotonic()
        for identifier in sorted(wanted & self.runtimes.keys()):
            runtime = self.runtimes[identifier]
            if runtime.error is not None and now - runtime.failed_at > RETRY_PREPARE_AFTER:
                del self.runtimes[identifier]  # no process to stop: extracting or loading failed
        for identifier in sorted(wanted - self.runtimes.keys()):
            self._start(identifier)
        for identifier in sorted(self.runtimes.keys() - wanted):
            self._drain(identifier)
        for identifier in list(self.declarations):
            if identifier not in wanted:
                del self.declarations[identifier]

    # -- changes made through this daemon ----------------------------------------------------

    @contextlib.asynccontextmanager
    async def pinned(self, identifier: str) -> Any:
        """Keep ``identifier``'s runtime while an install needs it, installed or not yet."""
        async with self._lock:
            self._pins[identifier] += 1
            self._converge()
        try:
            yield self.runtimes[identifier]
        finally:
            async with self._lock:
                self._pins[identifier] -= 1
                if self._pins[identifier] <= 0:
                    del self._pins[identifier]
                self._converge()

    async def change(self, fn: Any) -> Any:
        """Run ``fn(connection)`` (a change to the installations) and apply it here at once, so a
        request through this daemon right after sees it. Returns what ``fn`` returned."""
        async with self._lock:
            result = await self.database.run(fn)
        await self.refresh(None)
        return result

    # -- runtimes ---------------------------------------------------------------------------

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self, identifier: str) -> None:
        draining = self._draining.pop(identifier, None)
        if draining is not None and not draining.stopping:
            log.info("plugin %s: installed again while draining; kept", identifier)
            self.runtimes[identifier] = draining
            return
        runtime = InstalledRuntime(identifier, place_of(self.root, identifier))
        self.runtimes[identifier] = runtime
        after = draining.drain if draining is not None else None  # its folder goes first
        runtime.task = self._spawn(self._run(runtime, after), f"runtime {identifier}")

    async def _run(self, runtime: InstalledRuntime, after: asyncio.Future[Any] | None) -> None:
        if after is not None:  # the same identifier's last runtime, still stopping and removing
            await asyncio.gather(after, return_exceptions=True)
        try:
            await self._extract(runtime)
            spec = await asyncio.to_thread(load_plugin, runtime.folder, self.settings.validator_backend)
        except Exception as exc:
            known = isinstance(exc, PackageError | ValueError | OSError)
            runtime.error = str(exc) if known else f"cannot be prepared: {exc!r}"
            runtime.failed_at = time.monotonic()
            log.error("plugin %s cannot run: %s", runtime.identifier, runtime.error)
            runtime.built.set()
            return
        runtime.pool = PluginPool(spec, settings=self.settings, codec=self._codec, services=self._services)
        runtime.built.set()
        log.info("plugin %s: starting (installed runtime)", runtime.identifier)
        await runtime.pool.run()

    async def _extract(self, runtime: InstalledRuntime) -> None:
        """The package's files in the runtime's folder, from the database unless already there."""
        if (runtime.folder / "manifest.yaml").is_file():
            return
        data = await self.database.run(lambda c: store.package_bytes(c, runtime.identifier))
        if data is None:
            raise PackageError(f"the package {runtime.identifier} is not kept in the database")
        await asyncio.to_thread(self._unpack, runtime, data)

    def _unpack(self, runtime: InstalledRuntime, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=self.root))
        try:
            decoded = decode_into(io.BytesIO(data), scratch / "plugin", self._limits)
            if decoded.identifier != runtime.identifier:
                raise PackageError(
                    f"the package kept as {runtime.identifier} decodes as {decoded.identifier}"
                )
            runtime.folder.parent.mkdir(parents=True, exist_ok=True)
            (scratch / "plugin").rename(runtime.folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _drain(self, identifier: str) -> None:
        runtime = self.runtimes.pop(identifier)
        self._draining[identifier] = runtime
        log.info("plugin %s: no longer installed by any tenant; stopping once idle", identifier)
        runtime.drain = self._spawn(self._stop_when_idle(runtime), f"drain {identifier}")

    async def _stop_when_idle(self, runtime: InstalledRuntime) -> None:
        deadline = time.monotonic() + self.settings.plugin_max_execution_timeout
        while runtime.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if self._draining.get(runtime.identifier) is not runtime:
                return  # installed again: kept running
        async with self._lock:
            if self._draining.get(runtime.identifier) is not runtime:
                return
            runtime.stopping = True
        await runtime.stop()
        await asyncio.to_thread(shutil.rmtree, runtime.folder, True)
        if self._draining.get(runtime.identifier) is runtime:
            del self._draining[runtime.identifier]
        log.info("plugin %s: stopped and removed", runtime.identifier)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the runtimes of every installed identifier, then reconcile in the background."""
        for stale in self.root.glob(".extract-*") if self.root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        await self.refresh(None)
        self._loop = asyncio.get_running_loop().create_task(self._reconcile(), name="installations")

    async def _reconcile(self) -> None:
        interval = self.settings.plugin_installations_reconcile_interval
        timeout = self.settings.plugin_install_timeout * 60
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh(None)
                await self.database.run(functools.partial(_expire, timeout=timeout))
            except Exception:  # a database that is away for a while must not end the loop
                log.exception("installations: reconciling with the database failed; retrying")

    async def stop(self) -> None:
        """Stop every runtime (their folders stay for the next start) and every task here."""
        self._stopped = True
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        for task in list(self._tasks):
            if not task.get_name().startswith("runtime "):
                task.cancel()
        runtimes = [*self.runtimes.values(), *self._draining.values()]
        self.runtimes, self._draining = {}, {}
        await asyncio.gather(*(runtime.stop() for runtime in runtimes), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        """Run an install job in the background, owned here (cancelled when the daemon stops)."""
        return self._spawn(coroutine, name)
