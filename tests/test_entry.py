"""The lean ASGI entry for dispatch routes: same answers as Starlette's routing gives."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.entry import DaemonApp
from daemon.limits import BodyLimit

PATH = "/plugin/{tenant_id}/dispatch/tool/invoke"


async def invoke(request: Request) -> Response:
    if request.headers.get("x-fail"):
        raise RuntimeError("boom")
    body = await request.body()
    return JSONResponse({"tenant": request.path_params["tenant_id"], "bytes": len(body)})


async def other(request: Request) -> Response:
    return JSONResponse({"other": request.path_params["tenant_id"]})


def app() -> DaemonApp:
    application = DaemonApp(
        routes=[
            Route(PATH, invoke, methods=["POST"]),
            Route("/plugin/{tenant_id}/management/list", other, methods=["POST"]),
        ]
    )
    application.lean_routes({PATH: invoke}, lambda inner: BodyLimit(inner, limit=100))
    return application


def call(method: str, path: str, **options: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as client:
            return await client.request(method, path, **options)

    return asyncio.run(go())


def test_dispatch_route_is_served_with_its_path_parameter() -> None:
    r = call("POST", "/plugin/t1/dispatch/tool/invoke", content=b"abc")
    assert r.status_code == 200
    assert r.json() == {"tenant": "t1", "bytes": 3}


def test_body_limit_applies_on_the_lean_path() -> None:
    r = call("POST", "/plugin/t1/dispatch/tool/invoke", content=b"x" * 101)
    assert r.status_code == 413


def test_unhandled_error_is_a_json_500() -> None:
    r = call("POST", "/plugin/t1/dispatch/tool/invoke", headers={"x-fail": "1"})
    assert r.status_code == 500
    assert r.json()["code"] == -500


def test_other_paths_and_methods_go_through_starlette() -> None:
    assert call("POST", "/plugin/t1/management/list").json() == {"other": "t1"}
    assert call("GET", "/plugin/t1/dispatch/tool/invoke").status_code == 405
    assert call("POST", "/plugin//dispatch/tool/invoke").status_code == 404
    assert call("POST", "/plugin/t1/dispatch/tool/invoke/more").status_code == 404
