"""The raw HTTP request a plugin's endpoint gets (``daemon/endpoints/rawhttp.py``), read back
with h11, the parser the SDK's ``deserialize_request`` uses."""

from __future__ import annotations

import h11

from daemon.endpoints import rawhttp

HOOK = "abcdefghij012345"


def parsed(raw: bytes) -> tuple[h11.Request, bytes]:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def serialize(
    method: str = "GET", path: str = "/x", query: bytes = b"", body: bytes = b"", **headers: str
) -> bytes:
    given = [
        (name.replace("__", "_").replace("_", "-").encode(), value.encode())
        for name, value in headers.items()
    ]
    return rawhttp.serialize(
        method=method, path=path, raw_query=query, headers=given, body=body, hook_id=HOOK, scheme="http"
    )


def test_the_request_line_host_and_headers_as_go_writes_them() -> None:
    raw = serialize(
        "GET", "/a b/ü", b"z=1&a=2&a=1&e=", host="example.com:8080", user_agent="curl/8", x_custom="v"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    # The path escaped, the query sorted by key (values of a key in order), Host then User-Agent first.
    assert lines[0] == b"GET /a%20b/%C3%BC?a=2&a=1&e=&z=1 HTTP/1.1"
    assert lines[1:3] == [b"Host: example.com:8080", b"User-Agent: curl/8"]
    # The rest sorted by name, in Go's canonical case; the hook's own headers added.
    assert lines[3:] == [
        b"Dify-Hook-Id: " + HOOK.encode(),
        b"Dify-Hook-Url: http://example.com:8080/e/" + HOOK.encode() + b"/a%20b/%C3%BC",
        b"X-Custom: v",
    ]
    assert body == b""
    request, _ = parsed(raw)
    assert request.method == b"GET" and request.target == b"/a%20b/%C3%BC?a=2&a=1&e=&z=1"


def test_a_body_is_framed_once_by_its_length() -> None:
    raw = serialize("POST", body=b"hello", host="h", transfer_encoding="chunked", content_length="999")
    request, body = parsed(raw)
    assert body == b"hello"
    names = [name for name, _ in request.headers]
    assert names.count(b"content-length") == 1 and b"transfer-encoding" not in names
    assert dict(request.headers)[b"content-length"] == b"5"
    # POST, PUT and PATCH always say their length; GET only with a body.
    assert b"Content-Length: 0" in serialize("PUT", host="h")
    assert b"Content-Length" not in serialize("GET", host="h")


def test_proxy_traces_and_headers_the_sdk_refuses_are_dropped() -> None:
    raw = serialize(
        host="inner",
        x_forwarded_for="10.0.0.1",
        x_real_ip="10.0.0.2",
        x_original_host="outer.example",
        x_forwarded_proto="https",
        dify_hook_id="spoofed",
        **{"x__under": "refused by the SDK"},
    )
    request, _ = parsed(raw)
    headers = dict(request.headers)
    assert headers[b"host"] == b"outer.example"  # the host the caller used, as a proxy reported it
    assert (
        b"x-forwarded-for" not in headers
        and b"x-real-ip" not in headers
        and b"x-original-host" not in headers
    )
    assert b"x_under" not in headers
    assert headers[b"dify-hook-id"] == HOOK.encode()
    assert headers[b"dify-hook-url"] == b"https://outer.example/e/" + HOOK.encode() + b"/x"
    assert headers[b"x-forwarded-proto"] == b"https"
    # A Dify-Hook-Url the caller sets (a proxy in front) is kept, as upstream keeps it.
    assert b"Dify-Hook-Url: https://public/e/h/x" in serialize(host="h", dify_hook_url="https://public/e/h/x")


def test_repeated_headers_keep_their_order() -> None:
    raw = rawhttp.serialize(
        method="GET",
        path="/",
        raw_query=b"",
        headers=[(b"host", b"h"), (b"cookie", b"a=1"), (b"accept", b"x"), (b"cookie", b"b=2")],
        body=b"",
        hook_id=HOOK,
        scheme="http",
    )
    request, _ = parsed(raw)
    assert [v for n, v in request.headers if n == b"cookie"] == [b"a=1", b"b=2"]
