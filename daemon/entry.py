"""The ASGI entry: dispatch routes straight to their endpoint, everything else through Starlette.

A dispatch request is the daemon's hot path, and its fixed cost is paid once per
invocation: Starlette's route table (a regular expression per route), its error and
exception middleware and their per-message wrappers cost more than the rest of the
request handling before the plugin sees it. Dispatch paths are matched here by one
split and a dictionary lookup and sent through the same body limit and tracing
middleware as the rest of the app; every other path, method and the lifespan go to
Starlette unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.dispatch import BadRequest
from daemon.tracing import public_path

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
PREFIX = "/plugin/{tenant_id}/"


class DaemonApp(Starlette):
    """Starlette, with a lean path for ``POST /plugin/{tenant_id}/<dispatch route>``."""

    _lean: ASGIApp | None = None
    _endpoints: Mapping[str, Endpoint] = {}

    def lean_routes(self, endpoints: Mapping[str, Endpoint], wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        """Serve these paths (``/plugin/{tenant_id}/...``) directly, inside ``wrap``'s middleware."""
        self._endpoints = {path.removeprefix(PREFIX): endpoint for path, endpoint in endpoints.items()}
        self._lean = wrap(self._dispatch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._lean is not None and scope["type"] == "http" and scope["method"] == "POST":
            parts = scope["path"].split("/", 3)
            if len(parts) == 4 and parts[1] == "plugin" and parts[2] and not scope.get("root_path"):
                endpoint = self._endpoints.get(parts[3])
                if endpoint is not None:
                    scope["app"] = self
                    scope["endpoint"] = endpoint
                    scope["path_params"] = {"tenant_id": parts[2]}
                    await self._guarded(self._lean, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    @staticmethod
    async def _dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        response = await scope["endpoint"](Request(scope, receive))
        await response(scope, receive, send)

    @staticmethod
    async def _guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Outside the middleware, as Starlette's error middleware is."""
        try:
            await app(scope, receive, send)
        except Exception:
            # What Starlette's error middleware does: log, and answer 500 unless already answering.
            log.exception("unhandled error in %s %s", scope["method"], public_path(scope["path"]))
            error = BadRequest(500, "internal server error")
            with contextlib.suppress(RuntimeError, OSError):
                await JSONResponse(error.body(), status_code=500)(scope, receive, send)
