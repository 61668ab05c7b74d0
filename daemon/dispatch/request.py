"""Parsing and checking what Dify's API server sends to the dispatch endpoints.

Every way a request can be wrong maps to one :class:`BadRequest` with a status and a
message that says what was wrong; nothing malformed reaches the runtime. :func:`prepare`
makes every check of every dispatch kind, in one place and one order.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from starlette.requests import ClientDisconnect, Request

from daemon.errors import BAD_REQUEST, INTERNAL_ERROR, NOT_FOUND, PLUGIN_NOT_FOUND, UNAUTHORIZED, envelope

if TYPE_CHECKING:
    from daemon.dispatch.kinds import Kind
    from daemon.manifest import ToolSpec
    from daemon.runtime import PluginPool
    from daemon.runtime.tcp import RemotePlugin

TENANT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" would let a final newline in
# Deeper JSON parses, but cannot be encoded again for the plugin (orjson stops at 255 levels,
# and the request's envelope adds up to four), so it is refused as a bad request, not failed as a 500.
MAX_JSON_DEPTH = 250
_ENVELOPE_LEVELS = 4
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


class DispatchData(BaseModel):
    """A request's ``data``: the fields the daemon checks, and every other field passed on to
    the plugin as sent (the SDK's request models read what they need)."""

    model_config = ConfigDict(strict=True, extra="allow")


Name = Annotated[str, Field(min_length=1, max_length=256)]


class ToolInvokeData(DispatchData):
    provider: Name
    tool: Name
    tool_parameters: NullableDict = Field(default_factory=dict)
    credentials: NullableDict = Field(default_factory=dict)
    credential_type: Annotated[str, _none_is(lambda: "api-key")] = "api-key"


class CredentialsData(DispatchData):
    provider: Name
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


def data_model(
    name: str,
    names: tuple[str, ...] = ("provider",),
    present: tuple[str, ...] = (),
    model_type: str | None = None,
    nullable: tuple[str, ...] = (),
) -> type[DispatchData]:
    """A ``data`` model requiring what upstream's request type requires (``validate:"required"``
    in ``pkg/entities/requests``): non-empty strings ``names``, fields ``present``, and
    ``model_type`` equal to the kind's (any when ``"*"``); ``nullable`` fields are sent as
    null when absent, as Go sends them."""
    fields: dict[str, Any] = {field: (Name, ...) for field in names}
    fields.update({field: (Any, ...) for field in present})
    # Go sends every field of its request type, null when absent; the SDK needs some present.
    fields.update({field: (Any, None) for field in nullable})
    fields["credentials"] = (NullableDict, Field(default_factory=dict))
    if model_type == "*":
        fields["model_type"] = (Name, ...)
    elif model_type is not None:
        fields["model_type"] = (Literal[model_type], ...)  # type: ignore[valid-type]
    return create_model(name, __base__=DispatchData, **fields)


def request_model(data: type[DispatchData]) -> type[_Dispatch]:
    if data is ToolInvokeData:
        return InvokeToolRequest
    if data is CredentialsData:
        return ValidateCredentialsRequest
    return create_model(f"{data.__name__}Request", __base__=_Dispatch, data=(data, ...))


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
    try:
        within = getattr(request, "body_within", None)  # a direct request's: no async generator
        raw = await (within(limit) if within is not None else _streamed_body(request, limit))
    except ClientDisconnect:
        raise BadRequest(400, "the client disconnected before sending the whole body") from None
    if not raw:
        raise BadRequest(400, "empty request body; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"malformed JSON body: {exc}") from None
    # Only a body with that many brackets can be that deep: the usual one is not looked at.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and not _encodable_in_envelope(body):
        raise BadRequest(400, f"request body nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _encodable_in_envelope(body: Any) -> bool:
    """Whether ``body`` can be encoded at the depth the plugin's request puts it (in C, as fast as
    it was parsed: a walk in Python would cost a large body ten times its parse)."""
    wrapped = body
    for _ in range(_ENVELOPE_LEVELS):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return False
    return True


async def _streamed_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _ToolData(dict[str, Any]):
    """A checked tool ``data``, read as the model's fields are (``.provider``, ``.tool``)."""

    __slots__ = ()

    @property
    def provider(self) -> str:
        return self["provider"]  # type: ignore[no-any-return]

    @property
    def tool(self) -> str:
        return self["tool"]  # type: ignore[no-any-return]

    def model_dump(self) -> dict[str, Any]:
        return dict(self)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs five times as much
class _ToolInvoke:
    user_id: str
    conversation_id: str | None
    message_id: str | None
    app_id: str | None
    endpoint_id: str | None
    context: dict[str, Any]
    data: _ToolData


_OPTIONAL_IDS = ("conversation_id", "message_id", "app_id", "endpoint_id")


def _name(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= 256


def _tool_invoke(body: dict[str, Any]) -> _ToolInvoke | None:
    """The tool invocation request as :class:`InvokeToolRequest` would read it, checked by hand.

    The most frequent request of all: its usual, valid form is checked here in a few
    microseconds; anything else (a wrong type, a missing field, a value out of range)
    returns None and goes through the model, which says what is wrong in its words.
    """
    user_id = body.get("user_id")
    if user_id is None:
        user_id = ""
    elif type(user_id) is not str or len(user_id) > 256:
        return None
    ids = [body.get(name) for name in _OPTIONAL_IDS]
    for value in ids:
        if value is not None and type(value) is not str:
            return None
    context = body.get("context")
    if context is None:
        context = {}
    elif type(context) is not dict:
        return None
    data = body.get("data")
    if type(data) is not dict or not _name(data.get("provider")) or not _name(data.get("tool")):
        return None
    checked = _ToolData(data)
    for name in ("tool_parameters", "credentials"):
        value = checked.get(name)
        if value is None:
            checked[name] = {}
        elif type(value) is not dict:
            return None
    credential_type = checked.get("credential_type")
    if credential_type is None:
        checked["credential_type"] = "api-key"
    elif type(credential_type) is not str:
        return None
    return _ToolInvoke(user_id, *ids, context, checked)


def parse(model: type[BaseModel], body: Any, status: int = 422) -> Any:
    if not isinstance(body, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(body).__name__}")
    if model is InvokeToolRequest:
        fast = _tool_invoke(body)
        if fast is not None:
            return fast
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['problem']}" for e in errors[:5])
        raise BadRequest(status, f"invalid request body: {summary}", errors) from None


@dataclass(slots=True)  # made per request: not frozen, as _ToolInvoke
class Prepared:
    """A request that passed every check: who asks, which plugin, what to send it."""

    tenant: str
    pool: PluginPool | RemotePlugin
    parsed: Any
    tool: ToolSpec | None


async def prepare(
    request: Request,
    kind: Kind,
    *,
    server_key: str,
    find_pool: Callable[[str, str], PluginPool | RemotePlugin | None],
    limit: int,
    on_miss: Callable[[str, str], Awaitable[PluginPool | RemotePlugin | None]] | None = None,
) -> Prepared:
    """Every check of a dispatch request, in upstream's order: key, tenant, plugin, body.

    ``find_pool(plugin_id, tenant_id)`` is what serves the plugin to the tenant (a remote-debug
    connection of that tenant first); when it finds nothing, ``on_miss`` may look further (the
    tenant's installations in the database)."""
    check_key(request, server_key)
    tenant = tenant_id(request)
    plugin = plugin_id(request)
    pool = find_pool(plugin, tenant)
    if pool is None and on_miss is not None:
        pool = await on_miss(plugin, tenant)
    if pool is None:
        raise BadRequest(404, f"plugin {plugin!r} is not installed", error_type=PLUGIN_NOT_FOUND)
    body = await read_json(request, limit)
    parsed = parse(request_model(kind.data), body)
    tool = kind.lookup(pool.spec, parsed.data) if kind.lookup is not None else None
    return Prepared(tenant, pool, parsed, tool)
