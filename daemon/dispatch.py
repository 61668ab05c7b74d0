"""Parsing and checking what Dify's API server sends to the dispatch endpoints.

Every way a request can be wrong maps to one :class:`BadRequest` with a status and a
message that says what was wrong; nothing malformed reaches the runtime.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from daemon.errors import BAD_REQUEST, INTERNAL_ERROR, NOT_FOUND, UNAUTHORIZED, envelope

TENANT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PLUGIN_ID = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)/([A-Za-z0-9_][A-Za-z0-9_.-]*)(:[^@]+)?(@\S+)?$")


class BadRequest(Exception):
    """A request the daemon refuses before it reaches a plugin: an HTTP status and upstream's
    error type (``PluginDaemonBadRequestError`` unless said otherwise), in upstream's body."""

    def __init__(
        self,
        status: int,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        *,
        error_type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.error_type = error_type or _DEFAULT_TYPES.get(status, BAD_REQUEST)

    def body(self) -> dict[str, Any]:
        # Dify reads an error's type only when code is -500: a server-side refusal says -500
        # whatever its HTTP status (503 tells a proxy the plugin may come back).
        code = -500 if self.status >= 500 else -self.status
        return envelope(code, self.error_type, self.message, {"errors": self.errors} if self.errors else None)


_DEFAULT_TYPES = {401: UNAUTHORIZED, 404: NOT_FOUND, 500: INTERNAL_ERROR, 503: INTERNAL_ERROR}


def _none_is(default: Any) -> BeforeValidator:
    """Go decodes a JSON ``null`` as the field's zero value; so do we."""
    return BeforeValidator(lambda value: default() if value is None else value)


NullableDict = Annotated[dict[str, Any], _none_is(dict)]
NullableStr = Annotated[str, _none_is(str)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ToolInvokeData(_Strict):
    provider: str = Field(min_length=1, max_length=256)
    tool: str = Field(min_length=1, max_length=256)
    tool_parameters: NullableDict = Field(default_factory=dict)
    credentials: NullableDict = Field(default_factory=dict)
    credential_type: Annotated[str, _none_is(lambda: "api-key")] = "api-key"


class CredentialsData(_Strict):
    provider: str = Field(min_length=1, max_length=256)
    credentials: NullableDict = Field(default_factory=dict)


class _Dispatch(_Strict):
    user_id: NullableStr = Field(default="", max_length=256)
    conversation_id: str | None = None
    message_id: str | None = None
    app_id: str | None = None
    endpoint_id: str | None = None
    context: NullableDict = Field(default_factory=dict)


class InvokeToolRequest(_Dispatch):
    data: ToolInvokeData


class ValidateCredentialsRequest(_Dispatch):
    data: CredentialsData


def check_key(request: Request, server_key: str) -> None:
    given = request.headers.get("x-api-key")
    if given is None:
        raise BadRequest(401, "missing X-Api-Key header")
    if not hmac.compare_digest(given.encode(), server_key.encode()):
        raise BadRequest(401, "invalid X-Api-Key")


def tenant_id(request: Request) -> str:
    tenant = request.path_params["tenant_id"]
    if not TENANT_ID.match(tenant):
        raise BadRequest(400, "tenant_id must be 1 to 64 characters of letters, digits, '-' or '_'")
    return tenant


def plugin_id(request: Request) -> str:
    """``author/name`` from ``X-Plugin-ID`` (upstream may append ``:version@checksum``)."""
    header = request.headers.get("x-plugin-id")
    if not header:
        raise BadRequest(400, "missing X-Plugin-ID header")
    match = PLUGIN_ID.match(header.strip())
    if not match:
        raise BadRequest(400, f"X-Plugin-ID {header!r} is not of the form author/name")
    return f"{match.group(1)}/{match.group(2)}"


async def read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "the client disconnected before sending the whole body") from None
    raw = b"".join(chunks)
    if not raw:
        raise BadRequest(400, "empty request body; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"malformed JSON body: {exc}") from None


def parse(model: type[_Dispatch], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['problem']}" for e in errors[:5])
        raise BadRequest(422, f"invalid request body: {summary}", errors) from None
