"""An instance per tenant (opt-in), through HTTP against real fastproto processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.testing import Daemon
from tests.test_runtime import FP, wait_for


def tenant_pools(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {p["tenant_id"]: p for p in daemon.plugins()[FP]["tenant_pools"]}


def sessions_by_pid(daemon: Daemon) -> dict[str, tuple[int, int]]:
    """(pid, open sessions) of each tenant's ready instance."""
    found = {}
    for tenant, pool in tenant_pools(daemon).items():
        for instance in pool["instances"]:
            if instance["state"] == "ready":
                found[tenant] = (instance["pid"], instance["sessions"])
    return found


def test_sessions_of_two_tenants_never_share_a_process(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_instance_per_tenant=FP, plugin_tenant_idle_timeout=2)
    daemon.wait_ready(FP)
    (shared_pid,) = daemon.instance_pids(FP)
    hang = {"count": 1, "hang": True}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=60))
        opened: list[Any] = []

        def open_session(tenant: str) -> None:
            request = daemon.invocation(FP, "emit", hang)
            response = stack.enter_context(client.stream("POST", daemon.invoke_url(tenant), **request))
            assert response.status_code == 200
            chunks = response.iter_raw()
            next(chunks)  # the session is running in some process
            opened.append(chunks)  # keep a reference: a dropped iterator closes the response

        open_session("tenant-a")
        open_session("tenant-b")
        open_session("tenant-a")
        seen = sessions_by_pid(daemon)
        assert seen["tenant-a"][1] == 2 and seen["tenant-b"][1] == 1  # both of A's in A's process
        pids = {seen["tenant-a"][0], seen["tenant-b"][0], shared_pid}
        assert len(pids) == 3  # A's, B's, and the plugin's own (which served neither)
        assert [i["sessions"] for i in daemon.plugins()[FP]["instances"]] == [0]
    # Once idle for PLUGIN_TENANT_IDLE_TIMEOUT, tenants' instances are stopped; the plugin's stays.
    wait_for(lambda: tenant_pools(daemon) == {})
    wait_for(lambda: not any(psutil.pid_exists(seen[t][0]) for t in seen))
    assert daemon.invoke(FP, "emit", {"count": 1}, tenant="tenant-b")[-1].ok  # started again
    assert daemon.instance_pids(FP) == [shared_pid]


def test_tenant_instances_are_bounded_per_plugin(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_instance_per_tenant="true", plugin_tenant_pools_max=1)
    daemon.wait_ready(FP)
    request = daemon.invocation(FP, "emit", {"count": 1, "hang": True})
    with httpx.Client(timeout=60) as client, client.stream("POST", daemon.invoke_url("a"), **request) as r:
        chunks = r.iter_raw()
        next(chunks)
        busy = client.post(daemon.invoke_url("b"), **daemon.invocation(FP, "emit", {"count": 1}))
        assert busy.status_code == 503
        assert "PLUGIN_TENANT_POOLS_MAX" in busy.text
    # Tenant a's instance is idle now: it makes room for b's.
    wait_for(lambda: sessions_by_pid(daemon).get("a", (0, 1))[1] == 0)
    assert daemon.invoke(FP, "emit", {"count": 1}, tenant="b")[-1].ok
    assert set(tenant_pools(daemon)) == {"b"}
