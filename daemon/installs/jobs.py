"""Install and upgrade jobs: what runs in the background after ``install/identifiers`` or
``install/upgrade`` has answered with a task id.

A job keeps its identifier's runtime pinned, waits until the runtime serves (its virtualenv
installed, an instance ready) or fails, and only then writes the installation: a plugin that
cannot start is never installed, and the task says why (the install error, the last lines of
the plugin's stderr). Progress goes into the task row as upstream writes it: the plugin
``pending``, ``running`` with a message per step, then ``success`` or ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from daemon.installs import store
from daemon.installs.runtimes import Installations, InstalledRuntime
from daemon.installs.store import FAILED, RUNNING, SUCCESS
from daemon.state import DatabaseError

log = logging.getLogger("daemon.installs")

POLL = 0.1  # seconds between looks at a runtime that is getting ready
OUTCOME_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds between tries to record how a job ended


async def wait_serving(
    runtime: InstalledRuntime, timeout: float, progress: Callable[[str], Awaitable[None]]
) -> str | None:
    """Wait until ``runtime`` serves; None then, else why it does not (failed, or ``timeout``)."""
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        pool = runtime.pool
        if pool is None and runtime.error is not None:
            return runtime.error
        if pool is not None and pool.status == "ready":
            return None
        if pool is not None and pool.status == "failed":
            return runtime.reason()
        step = "extracting the package" if pool is None else pool.install.step or pool.status
        if step != said:
            said = step
            await progress(step)
        if time.monotonic() > deadline:
            return f"not ready after {timeout:g} s (PLUGIN_INSTALL_TIMEOUT): {runtime.reason()}"
        await asyncio.sleep(POLL)


class Job:
    """One plugin of one task: its status writes."""

    def __init__(self, installs: Installations, tenant: str, task_id: str, identifier: str) -> None:
        self.installs = installs
        self.tenant = tenant
        self.task_id = task_id
        self.identifier = identifier

    async def status(self, message: str, status: str | None = None) -> None:
        await self.installs.database.run(
            lambda c: store.set_plugin_status(c, self.tenant, self.task_id, self.identifier, message, status)
        )

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """``work``, with any failure written to the task instead of lost."""
        try:
            await work()
        except asyncio.CancelledError:
            raise  # the daemon is stopping: the reconcile loop of a daemon fails the task later
        except DatabaseError as exc:  # named, no traceback: the database is away, not a bug here
            log.error("plugin %s: install for tenant %s failed: %s", self.identifier, self.tenant, exc)
            await self.outcome(f"install failed: {exc}", FAILED)
        except Exception as exc:
            log.exception("plugin %s: install for tenant %s failed", self.identifier, self.tenant)
            await self.outcome(f"install failed: {exc}", FAILED)

    async def outcome(self, message: str, status: str) -> None:
        """The job's last status write, tried again while the database is away (SQLite locked
        past its busy timeout, PostgreSQL restarting): a task left running would keep Dify's
        console waiting until the task expires."""
        for pause in (*OUTCOME_RETRIES, None):
            try:
                await self.status(message, status)
                return
            except DatabaseError as exc:
                if pause is None:
                    log.error("plugin %s: cannot record the install's outcome: %s", self.identifier, exc)
                    return
                await asyncio.sleep(pause)
            except Exception:
                log.exception("plugin %s: cannot record the install's outcome", self.identifier)
                return

    async def serving(self, runtime: InstalledRuntime) -> bool:
        """Wait for the pinned runtime; False (and the task failed with the reason) if it fails."""
        timeout = self.installs.settings.plugin_install_timeout * 60
        reason = await wait_serving(runtime, timeout, lambda step: self.status(step))
        if reason is not None:
            log.error("plugin %s: install for tenant %s failed: %s", self.identifier, self.tenant, reason)
            await self.outcome(reason, FAILED)
            return False
        return True


async def install(
    installs: Installations, tenant: str, task_id: str, identifier: str, source: str, meta: Mapping[str, Any]
) -> None:
    """Install ``identifier`` for ``tenant`` (task ``task_id``)."""
    job = Job(installs, tenant, task_id, identifier)

    async def work() -> None:
        plugin_id = identifier.partition(":")[0]
        if await installs.database.run(lambda c: store.installation(c, tenant, plugin_id=plugin_id)):
            await job.outcome("installed", SUCCESS)  # upstream: the tenant already has this plugin id
            return
        await job.status("starting", RUNNING)
        async with installs.pinned(identifier) as runtime:
            if not await job.serving(runtime):
                return
            await installs.change(lambda c: store.install(c, tenant, identifier, source=source, meta=meta))
        log.info("plugin %s: installed for tenant %s", identifier, tenant)
        await job.outcome("installed", SUCCESS)

    await job.run(work)


async def upgrade(
    installs: Installations,
    tenant: str,
    task_id: str,
    original: str,
    new: str,
    source: str,
    meta: Mapping[str, Any],
) -> None:
    """Move ``tenant`` from ``original`` to ``new`` once ``new`` serves; ``original`` keeps
    serving meanwhile, and stops after its sessions if no tenant has it any more."""
    job = Job(installs, tenant, task_id, new)

    async def work() -> None:
        await job.status("starting", RUNNING)
        async with installs.pinned(new) as runtime:
            if not await job.serving(runtime):
                return
            moved = await installs.change(
                lambda c: store.upgrade(c, tenant, original, new, source=source, meta=meta)
            )
        if moved is None:
            await job.outcome(f"plugin {original} is not installed for this tenant any more", FAILED)
            return
        log.info("plugin %s: upgraded to %s for tenant %s", original, new, tenant)
        await job.outcome("upgraded", SUCCESS)

    await job.run(work)
