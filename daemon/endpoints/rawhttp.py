"""The caller's request as the raw HTTP/1.1 message the SDK parses (``raw_http_request``).

Upstream (``copyRequest`` in ``internal/service/endpoint.go`` of langgenius/dify-plugin-daemon)
clones the request with the path below the hook, re-encodes the query (sorted by key), reads
the whole body and writes the request with Go's ``Request.Write``: request line, ``Host``,
``User-Agent``, ``Content-Length`` (when there is a body, and always for POST, PUT and PATCH),
then the other headers sorted by name in Go's canonical case. The addresses a proxy added are
removed, ``Dify-Hook-Id`` is set, and ``Dify-Hook-Url`` is set unless the caller sent one.

The SDK (``deserialize_request`` in ``dify_plugin``) refuses a header whose name has an
underscore and a body framed twice, so such headers are dropped here rather than failing the
request in the plugin (nginx drops underscored headers by default for the same reason).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, urlencode

# Removed "for security" upstream, plus the framing this message sets itself.
DROPPED = frozenset(
    {
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded",
        b"x-original-forwarded-for",
        b"x-original-url",
        b"x-original-host",
        b"host",
        b"user-agent",
        b"content-length",
        b"transfer-encoding",
        b"trailer",
        b"dify-hook-id",
    }
)
_WITH_LENGTH = frozenset({"POST", "PUT", "PATCH"})


def canonical(name: bytes) -> bytes:
    """Go's ``CanonicalMIMEHeaderKey``: ``content-type`` -> ``Content-Type``."""
    return b"-".join(part[:1].upper() + part[1:].lower() for part in name.split(b"-"))


def query(raw: bytes) -> str:
    """The query re-encoded as Go's ``url.Values.Encode`` does: sorted by key, values in order."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return urlencode(sorted(pairs, key=lambda pair: pair[0]), encoding="latin-1")


def escaped(path: str) -> str:
    """A path escaped as Go's ``URL.EscapedPath`` escapes it."""
    return quote(path, safe="/:@!$&'()*+,;=-._~")


def target(path: str, raw_query: bytes) -> bytes:
    """Request target: the path below the hook and the query."""
    encoded = query(raw_query)
    return (escaped(path) + ("?" + encoded if encoded else "")).encode()


def serialize(
    *,
    method: str,
    path: str,
    raw_query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    hook_id: str,
    scheme: str,
) -> bytes:
    """The request as HTTP/1.1 bytes, for the plugin's endpoint to parse."""
    given = list(headers)
    found = {name: value for name, value in given}
    host = found.get(b"x-original-host") or found.get(b"host") or b"localhost"
    if found.get(b"x-forwarded-proto") == b"https":
        scheme = "https"
    lines = [method.encode() + b" " + target(path, raw_query) + b" HTTP/1.1", b"Host: " + host]
    if found.get(b"user-agent"):
        lines.append(b"User-Agent: " + found[b"user-agent"])
    if body or method in _WITH_LENGTH:
        lines.append(b"Content-Length: %d" % len(body))
    rest = [
        (canonical(name), value)
        for name, value in given
        if name not in DROPPED and b"_" not in name and name != b"dify-hook-url"
    ]
    rest.append((b"Dify-Hook-Id", hook_id.encode()))
    hook_url = found.get(b"dify-hook-url") or f"{scheme}://".encode() + host + (
        f"/e/{hook_id}{escaped(path)}".encode()
    )
    rest.append((b"Dify-Hook-Url", hook_url))
    rest.sort(key=lambda header: header[0])  # stable: repeated headers keep their order
    lines += [name + b": " + value for name, value in rest]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
