"""Faults injected into a real daemon process for tests of its defences against its own bugs.

A daemon started with ``PYTHONPATH`` set to this directory and ``DAEMON_TEST_FAULT`` naming a
fault imports this module at start-up (Python's ``sitecustomize`` hook); without the variable
it does nothing. Plugins never see it: their environment has no ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

if os.environ.get("DAEMON_TEST_FAULT") == "open_session":
    # A session whose tool parameters ask for it fails as it opens: after the request was
    # accepted, before anything of the response has been written.
    from daemon.runtime import connection

    _send = connection.Connection.send

    async def _failing_send(self: connection.Connection, message: Mapping[str, Any]) -> None:
        parameters = message.get("data", {}).get("tool_parameters", {})
        if isinstance(parameters, dict) and parameters.get("fail_open"):
            raise RuntimeError("fault injected by the test: the session failed as it opened")
        await _send(self, message)

    connection.Connection.send = _failing_send  # type: ignore[method-assign]
