"""How Dify's API server reads a dispatch response, rule by rule, to check the daemon against.

Written here from the rules in langgenius/dify ``api/core/plugin/impl/base.py``
(``_stream_request``, ``_request_with_plugin_daemon_response_stream``,
``_handle_plugin_daemon_error``), ``api/core/plugin/entities/plugin_daemon.py``
(``PluginDaemonBasicResponse``, ``PluginDaemonError``) and ``api/core/plugin/impl/exc.py``
(the exception classes, whose *names* are what the daemon's ``error_type`` must match).
It is deliberately not the daemon's own parser: a test passes only if the bytes on the
wire make Dify raise the class named in the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class PluginDaemonError(Exception):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class PluginDaemonClientSideError(PluginDaemonError): ...


class PluginDaemonInternalServerError(PluginDaemonError): ...


class PluginDaemonUnauthorizedError(PluginDaemonError): ...


class PluginDaemonNotFoundError(PluginDaemonError): ...


class PluginDaemonBadRequestError(PluginDaemonError): ...


class PluginUniqueIdentifierError(PluginDaemonError): ...


class PluginNotFoundError(PluginDaemonError): ...


class PluginPermissionDeniedError(PluginDaemonError): ...


class PluginInvokeError(PluginDaemonError, ValueError):
    """Dify's workflow tool node catches this one and reads the inner type and message."""

    def _inner(self) -> dict[str, Any]:
        try:
            value = json.loads(self.description)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def get_error_type(self) -> str:
        return self._inner().get("error_type", "unknown")

    def get_error_message(self) -> str:
        return self._inner().get("message", "unknown")


class PluginDaemonInnerError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ModelInvokeError(Exception):
    """Stands for graphon's Invoke*Error classes and CredentialsValidateFailedError: Dify raises
    one of them, by the inner type's name, for a PluginInvokeError whose inner type is one."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class UnknownDaemonError(Exception):
    """Dify's bare ``Exception("got unknown error from plugin daemon: ...")``."""


MODEL_ERRORS = {
    "InvokeRateLimitError",
    "InvokeAuthorizationError",
    "InvokeBadRequestError",
    "InvokeConnectionError",
    "InvokeServerUnavailableError",
    "CredentialsValidateFailedError",
    "EndpointSetupFailedError",
    "TriggerProviderCredentialValidationError",
    "TriggerPluginInvokeError",
    "TriggerInvokeError",
    "EventIgnoreError",
    "PluginLLMPollingUnsupportedError",
}
OUTER = {
    cls.__name__: cls
    for cls in (
        PluginDaemonInternalServerError,
        PluginDaemonBadRequestError,
        PluginDaemonNotFoundError,
        PluginUniqueIdentifierError,
        PluginNotFoundError,
        PluginDaemonUnauthorizedError,
        PluginPermissionDeniedError,
    )
}


def lines(response: httpx.Response) -> Iterator[str]:
    """Every non-empty line, stripped, with a leading ``data:`` removed (any HTTP status)."""
    for raw in response.iter_lines():
        line = raw.strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        if line:
            yield line


def raise_daemon_error(error_type: str, message: str) -> None:
    if error_type == "PluginDaemonInnerError":
        raise PluginDaemonInnerError(-500, message)
    if error_type == "PluginInvokeError":
        inner = json.loads(message)  # Dify does not guard this: a non-JSON message is a crash
        if inner.get("error_type") in MODEL_ERRORS:
            raise ModelInvokeError(inner["error_type"], inner.get("message"))
        raise PluginInvokeError(message)
    if error_type in OUTER:
        raise OUTER[error_type](message)
    raise UnknownDaemonError(f"got unknown error from plugin daemon: {error_type}, message: {message}")


def _basic_response(line: str) -> dict[str, Any]:
    """``PluginDaemonBasicResponse``: ``code`` int, ``message`` str, ``data`` optional."""
    value = json.loads(line)
    if not isinstance(value, dict) or not isinstance(value.get("code"), int):
        raise TypeError("not a PluginDaemonBasicResponse")
    if not isinstance(value.get("message"), str):
        raise TypeError("not a PluginDaemonBasicResponse")
    return value


def read_stream(response: httpx.Response) -> Iterator[Any]:
    """Yield each event's ``data``; raise what Dify raises for an error event."""
    for line in lines(response):
        try:
            rep = _basic_response(line)
        except (ValueError, TypeError):
            try:
                line_data = json.loads(line)
            except ValueError:
                raise ValueError(line) from None
            raise ValueError(line_data.get("error", line) if isinstance(line_data, dict) else line) from None
        if rep["code"] != 0:
            if rep["code"] == -500:
                try:
                    error = json.loads(rep["message"])
                    if not (
                        isinstance(error.get("error_type"), str) and isinstance(error.get("message"), str)
                    ):
                        raise TypeError("not a PluginDaemonError")
                except (ValueError, TypeError, AttributeError):
                    raise PluginDaemonInnerError(rep["code"], rep["message"]) from None
                raise_daemon_error(error["error_type"], error["message"])
            raise ValueError(f"plugin daemon: {rep['message']}, code: {rep['code']}")
        if rep.get("data") is None:
            raise ValueError("got empty data from plugin daemon")
        yield rep["data"]


def dispatch(client: httpx.Client, url: str, headers: dict[str, str], body: Any) -> list[Any]:
    """POST as Dify does (JSON body) and read the whole stream."""
    with client.stream("POST", url, headers=headers, content=json.dumps(body)) as response:
        return list(read_stream(response))


def request(client: httpx.Client, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> Any:
    """A non-streaming call (management routes): Dify's ``_request_with_plugin_daemon_response``."""
    response = client.request(method, url, headers=headers, **kwargs)
    if response.status_code >= 400:
        cls = PluginDaemonClientSideError if response.status_code < 500 else PluginDaemonInternalServerError
        raise cls(f"HTTP {response.status_code}: {response.text}")
    rep = _basic_response(response.text)
    if rep["code"] != 0:
        error = json.loads(rep["message"])
        raise_daemon_error(error["error_type"], error["message"])
    if rep.get("data") is None:
        raise ValueError("got empty data from plugin daemon")
    return rep["data"]
