"""Who may read the operator endpoints (``/metrics``, ``/debug/*``).

``loopback`` (the default) lets clients on this machine in freely and asks
everyone else for the server key: as ``X-Api-Key``, as ``Authorization: Bearer``
(what Prometheus can send), or, for browsers on the debug pages, as a cookie set by
``/debug/login``. ``key`` always asks; ``open`` never does; ``off`` hides the endpoint.

"Local" has one definition, :func:`is_local`, the same uvicorn applies: the client
address uvicorn resolves (it believes ``X-Forwarded-For`` only from the proxies in
``FORWARDED_ALLOW_IPS``) is a loopback address, and the request did not come
through a proxy it does not trust. A reverse proxy on 127.0.0.2 that forwards a
remote client's request therefore does not make that client local, and a plugin
process connecting over loopback is not local either (:mod:`daemon.isolation`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.requests import Request

from daemon import isolation
from daemon.config import Access

COOKIE = "plugin_daemon_debug"


def cookie_token(server_key: str) -> str:
    """A cookie value derived from the key, so the key itself never sits in a browser."""
    return hmac.new(server_key.encode(), b"debug-pages", hashlib.sha256).hexdigest()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local(request: Request, plugins: isolation.PluginMarks | None = None) -> bool:
    """A loopback client that reached us directly or through a trusted proxy, and is no plugin."""
    host = request.client.host if request.client else ""
    if not _loopback(host):
        return False
    forwarded_for = request.headers.get("x-forwarded-for")
    if forwarded_for is not None:
        # uvicorn replaced the peer by a listed address only if it trusts the peer; a loopback
        # peer it did not trust is a proxy speaking for somebody else.
        if host not in [part.strip() for part in forwarded_for.split(",")]:
            return False
    elif "forwarded" in request.headers:  # RFC 7239: uvicorn does not read it, so it is not trusted
        return False
    return not isolation.peer_is_plugin(request, plugins)


def presented_key(request: Request, server_key: str) -> bool:
    candidates = [request.headers.get("x-api-key", "")]
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        candidates.append(authorization[7:].strip())
    if any(c and hmac.compare_digest(c.encode(), server_key.encode()) for c in candidates):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), cookie_token(server_key).encode())


def check(
    request: Request, access: Access, server_key: str, plugins: isolation.PluginMarks | None = None
) -> int | None:
    """None if the request may proceed, else the HTTP status to refuse it with."""
    if access is Access.OFF:
        return 404
    if access is Access.OPEN or (access is Access.LOOPBACK and is_local(request, plugins)):
        return None
    return None if presented_key(request, server_key) else 401
