"""Every way a dispatch call fails lands on the exception Dify's API server would raise.

The responses are read by ``tests/dify_client.py``, which follows Dify's own parsing rules,
not the daemon's: a wrong outer ``error_type`` shows up here as ``UnknownDaemonError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from daemon.testing import Daemon, serving
from tests import dify_client as dify

TK = "demo/text_toolkit"
FP = "demo/fastproto"
STUCK = "demo/stuck"


@pytest.fixture(scope="module")
def fp_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """fastproto with a 2 s execution limit, beside a copy that never becomes ready."""
    copies = [("fastproto", None, None), ("fastproto", {"no_heartbeat": True}, "stuck")]
    limits = {"plugin_max_execution_timeout": 2, "plugin_ready_timeout": 2}
    with serving(tmp_path_factory.mktemp("dify-errors"), copies, **limits) as daemon:
        daemon.wait_ready(FP)
        yield daemon


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def _url(daemon: Daemon, route: str = "tool/invoke", tenant: str = "t1") -> str:
    return f"{daemon.url}/plugin/{tenant}/dispatch/{route}"


def _tool(provider: str, tool: str, params: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "user_id": "u1",
        "data": {"provider": provider, "tool": tool, "tool_parameters": params or {}, "credentials": {}},
    }


def test_a_plugin_that_raises_is_a_plugin_invoke_error_with_its_type(
    sdk_daemon: Daemon, client: httpx.Client
) -> None:
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(
            client,
            _url(sdk_daemon),
            sdk_daemon.headers(TK),
            _tool("text_toolkit", "flaky", {"fail_after": 1}),
        )
    assert caught.value.get_error_type() == "RuntimeError"
    assert caught.value.get_error_message() == "flaky tool gave up after 1 steps"


def test_a_failed_credential_check_is_a_plugin_invoke_error(sdk_daemon: Daemon, client: httpx.Client) -> None:
    body = {"user_id": "u1", "data": {"provider": "text_toolkit", "credentials": {"reject": "k-123"}}}
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(client, _url(sdk_daemon, "tool/validate_credentials"), sdk_daemon.headers(TK), body)
    assert caught.value.get_error_type() == "ToolProviderCredentialValidationError"
    assert caught.value.get_error_message() == "credential rejected: k-123"


def test_a_schema_violation_is_a_plugin_invoke_error(sdk_daemon: Daemon, client: httpx.Client) -> None:
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(
            client, _url(sdk_daemon), sdk_daemon.headers(TK), _tool("text_toolkit", "broken_schema")
        )
    assert caught.value.get_error_type() == "ToolOutputValidationError"
    assert "'maximum'" in caught.value.get_error_message()


def test_an_unknown_tool_of_a_known_plugin_goes_to_the_plugin(
    sdk_daemon: Daemon, client: httpx.Client
) -> None:
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(client, _url(sdk_daemon), sdk_daemon.headers(TK), _tool("text_toolkit", "no_such_tool"))
    assert "no_such_tool" in caught.value.get_error_message()
    body = {"user_id": "u1", "data": {"provider": "nope", "credentials": {}}}
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(client, _url(sdk_daemon, "tool/validate_credentials"), sdk_daemon.headers(TK), body)
    assert caught.value.get_error_message() == "Provider `nope` not found"


def test_what_go_accepts_is_accepted(sdk_daemon: Daemon, client: httpx.Client) -> None:
    """``user_id`` null or missing, ``credentials``/``tool_parameters``/``context`` null."""
    for body in (
        {
            "user_id": None,
            "context": None,
            "data": {
                "provider": "text_toolkit",
                "tool": "word_stats",
                "tool_parameters": {"text": "a b"},
                "credentials": None,
            },
        },
        {
            "data": {
                "provider": "text_toolkit",
                "tool": "word_stats",
                "tool_parameters": {"text": "a b"},
                "credential_type": None,
            }
        },
    ):
        data = dify.dispatch(client, _url(sdk_daemon), sdk_daemon.headers(TK), body)
        assert data[0] == {"type": "text", "message": {"text": "2 words, 2 unique"}, "meta": None}


def test_a_timeout_is_an_internal_server_error(fp_daemon: Daemon, client: httpx.Client) -> None:
    with pytest.raises(dify.PluginDaemonInternalServerError) as caught:
        dify.dispatch(
            client, _url(fp_daemon), fp_daemon.headers(FP), _tool("fastproto", "emit", {"hang": True})
        )
    assert caught.value.description.startswith("killed by timeout")


def test_no_ready_runtime_is_an_internal_server_error(fp_daemon: Daemon, client: httpx.Client) -> None:
    with pytest.raises(dify.PluginDaemonInternalServerError) as caught:
        dify.dispatch(client, _url(fp_daemon), fp_daemon.headers(STUCK), _tool("fastproto", "emit"))
    assert "plugin runtime not found" in caught.value.description


def test_an_instance_that_dies_is_a_plugin_invoke_error(fp_daemon: Daemon, client: httpx.Client) -> None:
    with pytest.raises(dify.PluginInvokeError) as caught:
        dify.dispatch(
            client,
            _url(fp_daemon),
            fp_daemon.headers(FP),
            _tool("fastproto", "emit", {"count": 3, "crash_at": 1}),
        )
    assert caught.value.get_error_type() == "PluginInstanceDiedError"
    fp_daemon.wait_ready(FP, limit=60)


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [
        ("bad key", 401, "PluginDaemonUnauthorizedError"),
        ("not installed", 404, "PluginNotFoundError"),
        ("no plugin id", 400, "PluginDaemonBadRequestError"),
        ("not json", 400, "PluginDaemonBadRequestError"),
        ("wrong content type", 415, "PluginDaemonBadRequestError"),
        ("missing field", 422, "PluginDaemonBadRequestError"),
        ("unknown route", 404, "PluginDaemonNotFoundError"),
    ],
)
def test_each_refusal_is_what_dify_raises_for_a_4xx(
    fp_daemon: Daemon, client: httpx.Client, case: str, status: int, error_type: str
) -> None:
    headers = fp_daemon.headers(FP)
    url, content = _url(fp_daemon), json.dumps(_tool("fastproto", "emit"))
    if case == "bad key":
        headers["X-Api-Key"] = "wrong"
    elif case == "not installed":
        headers["X-Plugin-ID"] = "demo/absent"
    elif case == "no plugin id":
        del headers["X-Plugin-ID"]
    elif case == "not json":
        content = "{nope"
    elif case == "wrong content type":
        headers["Content-Type"] = "text/plain"
    elif case == "missing field":
        content = json.dumps({"user_id": "u", "data": {"provider": "fastproto"}})
    elif case == "unknown route":
        url = _url(fp_daemon, "tool/no_such_action")
    with client.stream("POST", url, headers=headers, content=content) as response:
        assert response.status_code == status
        line = json.loads(response.read())
        # Dify's stream reader turns any code other than -500 into a ValueError with the message.
        with pytest.raises(ValueError, match=f"code: -{status}$"):
            list(dify.read_stream(response))
    inner = json.loads(line["message"])
    assert inner["error_type"] == error_type
    assert inner["message"]
