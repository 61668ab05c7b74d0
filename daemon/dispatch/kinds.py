"""Every dispatch kind Dify's API server calls, one row each.

A row says where the route is (below ``/plugin/{tenant_id}/dispatch/``), which ``data``
it takes, how the daemon finds the declaration the output is checked against, and what the
plugin is sent: the SDK routes a request by ``data.type`` and ``data.action``
(``dify_plugin/plugin.py``; the names are upstream's ``access_types`` in
``internal/core/io_tunnel/access_types`` of langgenius/dify-plugin-daemon). The app registers
one route per row and ``request.prepare`` checks every request against its row.

Every kind but LLM polling answers as upstream's ``baseSSEService`` does: ``text/event-stream``,
one event per message the plugin streams, errors as the final event. ``framing`` says what the
SDK streams: ``stream`` for many chunks, ``single`` for one answer (a result, a count, a
schema); ``json`` is one answer sent as a plain JSON body, as upstream sends polling results
(``daemon/dispatch/answer.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from daemon.dispatch.request import CredentialsData, DispatchData, ToolInvokeData, data_model
from daemon.manifest import PluginSpec, ToolSpec

Framing = Literal["stream", "single", "json"]
SpecLookup = Callable[[PluginSpec, Any], ToolSpec | None]


def tool_output_spec(spec: PluginSpec, data: Any) -> ToolSpec | None:
    """The tool's declaration, for its ``output_schema``. A provider or tool the manifest does
    not declare still goes to the plugin, as upstream sends it: the plugin's answer is the error."""
    provider = spec.providers.get(data.provider)
    return provider.tools.get(data.tool) if provider is not None else None


class CheckPollingData(data_model("check_polling", ("provider", "model"), model_type="llm")):  # type: ignore[misc]
    """The state the plugin gave when the polling started, handed back: a non-empty object, as
    upstream requires it (``RequestCheckPolling``)."""

    plugin_state: dict[str, Any] = Field(min_length=1)


@dataclass(frozen=True)
class Kind:
    route: str
    type: str
    action: str
    data: type[DispatchData]
    framing: Framing = "single"
    lookup: SpecLookup | None = None  # only tools have output to validate

    @property
    def path(self) -> str:
        return f"/plugin/{{tenant_id}}/dispatch/{self.route}"


def _model(
    route: str,
    action: str,
    *names: str,
    model_type: str,
    present: tuple[str, ...] = (),
    framing: Framing = "single",
    nullable: tuple[str, ...] = (),
) -> Kind:
    fields = ("provider", "model", *names)
    return Kind(route, "model", action, data_model(action, fields, present, model_type, nullable), framing)


def _simple(
    route: str,
    type_: str,
    action: str,
    *names: str,
    framing: Framing = "single",
    present: tuple[str, ...] = (),
) -> Kind:
    return Kind(route, type_, action, data_model(action, ("provider", *names), present), framing)


KINDS: tuple[Kind, ...] = (
    Kind("tool/invoke", "tool", "invoke_tool", ToolInvokeData, "stream", tool_output_spec),
    Kind("tool/validate_credentials", "tool", "validate_tool_credentials", CredentialsData),
    _simple("tool/get_runtime_parameters", "tool", "get_tool_runtime_parameters", "tool"),
    _model("llm/invoke", "invoke_llm", model_type="llm", framing="stream", nullable=("tools", "stop")),
    _model("llm/num_tokens", "get_llm_num_tokens", model_type="llm", nullable=("tools",)),
    _model("text_embedding/invoke", "invoke_text_embedding", model_type="text-embedding", present=("texts",)),
    _model(
        "text_embedding/num_tokens",
        "get_text_embedding_num_tokens",
        model_type="text-embedding",
        present=("texts",),
    ),
    _model(
        "multimodal_embedding/invoke", "invoke_multimodal_embedding", model_type="*", present=("documents",)
    ),
    _model("rerank/invoke", "invoke_rerank", model_type="rerank", present=("query", "docs")),
    _model("multimodal_rerank/invoke", "invoke_multimodal_rerank", model_type="*", present=("query", "docs")),
    _model(
        "tts/invoke", "invoke_tts", "voice", model_type="tts", present=("content_text",), framing="stream"
    ),
    _model("tts/model/voices", "get_tts_model_voices", model_type="tts"),
    _model("speech2text/invoke", "invoke_speech2text", model_type="speech2text", present=("file",)),
    _model("moderation/invoke", "invoke_moderation", model_type="moderation", present=("text",)),
    _simple("model/validate_provider_credentials", "model", "validate_provider_credentials"),
    _model("model/validate_model_credentials", "validate_model_credentials", model_type="*"),
    _model("model/schema", "get_ai_model_schemas", model_type="*"),
    _model(
        "model/polling/start", "start_polling", model_type="llm", framing="json", nullable=("tools", "stop")
    ),
    Kind("model/polling/check", "model", "check_polling", CheckPollingData, "json"),
    Kind(
        "agent_strategy/invoke",
        "agent_strategy",
        "invoke_agent_strategy",
        data_model("invoke_agent_strategy", ("agent_strategy_provider", "agent_strategy")),
        "stream",
    ),
    _simple("oauth/get_authorization_url", "oauth", "get_authorization_url", "redirect_uri"),
    _simple("oauth/get_credentials", "oauth", "get_credentials", "redirect_uri"),
    _simple("oauth/refresh_credentials", "oauth", "refresh_credentials", "redirect_uri"),
    _simple(
        "dynamic_select/fetch_parameter_options",
        "dynamic_parameter",
        "fetch_parameter_options",
        "provider_action",
        "parameter",
    ),
    _simple("datasource/validate_credentials", "datasource", "validate_datasource_credentials"),
    _simple(
        "datasource/get_website_crawl",
        "datasource",
        "invoke_website_datasource_get_crawl",
        "datasource",
        framing="stream",
    ),
    _simple(
        "datasource/get_online_document_pages",
        "datasource",
        "invoke_online_document_datasource_get_pages",
        "datasource",
        framing="stream",
    ),
    _simple(
        "datasource/get_online_document_page_content",
        "datasource",
        "invoke_online_document_datasource_get_page_content",
        "datasource",
        present=("page",),
        framing="stream",
    ),
    _simple(
        "datasource/online_drive_browse_files",
        "datasource",
        "invoke_online_drive_browse_files",
        "datasource",
        present=("request",),
        framing="stream",
    ),
    _simple(
        "datasource/online_drive_download_file",
        "datasource",
        "invoke_online_drive_download_file",
        "datasource",
        present=("request",),
        framing="stream",
    ),
    _simple("trigger/invoke_event", "trigger", "invoke_trigger_event", "event"),
    _simple("trigger/validate_credentials", "trigger", "validate_trigger_credentials"),
    _simple("trigger/dispatch_event", "trigger", "dispatch_trigger_event"),
    _simple("trigger/subscribe", "trigger", "subscribe_trigger", "endpoint"),
    _simple("trigger/unsubscribe", "trigger", "unsubscribe_trigger"),
    _simple("trigger/refresh", "trigger", "refresh_trigger"),
)
