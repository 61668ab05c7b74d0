"""Who may read the operator endpoints (``/metrics``, ``/debug/*``).

``loopback`` (the default) lets clients on this machine in freely and asks
everyone else for the server key: as ``X-Api-Key``, as ``Authorization: Bearer``
(what Prometheus can send), or, for browsers on the debug pages, as a cookie set by
``/debug/login``. ``key`` always asks; ``open`` never does; ``off`` hides the endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.requests import Request

from daemon.config import Access

COOKIE = "plugin_daemon_debug"


def cookie_token(server_key: str) -> str:
    """A cookie value derived from the key, so the key itself never sits in a browser."""
    return hmac.new(server_key.encode(), b"debug-pages", hashlib.sha256).hexdigest()


def _from_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def presented_key(request: Request, server_key: str) -> bool:
    candidates = [request.headers.get("x-api-key", "")]
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        candidates.append(authorization[7:].strip())
    if any(c and hmac.compare_digest(c.encode(), server_key.encode()) for c in candidates):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), cookie_token(server_key).encode())


def check(request: Request, access: Access, server_key: str) -> int | None:
    """None if the request may proceed, else the HTTP status to refuse it with."""
    if access is Access.OFF:
        return 404
    if access is Access.OPEN or (access is Access.LOOPBACK and _from_loopback(request)):
        return None
    return None if presented_key(request, server_key) else 401
