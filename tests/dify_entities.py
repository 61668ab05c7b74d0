"""Pydantic models of the entities Dify's API server parses management responses into.

Written here, field by field, from langgenius/dify:
``api/core/plugin/entities/plugin_daemon.py`` (``PluginDaemonBasicResponse``,
``PluginToolProviderEntity``, ``PluginModelProviderEntity``, ``PluginAgentProviderEntity``,
``PluginListResponse``, ``PluginInstallTask``, ``PluginInstallTaskStartResponse``,
``PluginDecodeResponse``), ``api/core/plugin/entities/plugin.py`` (``PluginDeclaration``,
``PluginInstallation``, ``PluginEntity``, ``MissingPluginDependency``),
``api/core/plugin/entities/parameters.py`` (``PluginParameter``),
``api/core/tools/entities/tool_entities.py`` (tool provider and tool entities),
``api/core/agent/plugin_entities.py`` (agent strategy entities),
``api/core/datasource/entities/datasource_entities.py`` (``PluginDatasourceProviderEntity``'s
declaration), ``api/core/trigger/entities/entities.py`` (``PluginTriggerProviderEntity``'s),
``api/core/entities/provider_entities.py`` (``ProviderConfig``), ``api/core/plugin/entities/endpoint.py``
(endpoints) and the model runtime's
``provider_entities.py`` / ``model_entities.py`` (``ProviderEntity``, ``AIModelEntity``), and
langgenius/graphon's ``llm_entities.py`` (``LLMPollingResult``, which Dify's model runtime uses);
for dispatch answers, ``datasource_entities.py`` (``WebsiteCrawlMessage``) and
``api/core/plugin/entities/request.py`` (``TriggerInvokeEventResponse``, ``TriggerDispatchResponse``,
``TriggerSubscriptionResponse``), ``PluginBasicBooleanResponse``, the trigger ``Subscription``
whose ``response`` is read by the rules of ``api/core/plugin/utils/http_parser.py``).
Only what decides whether a response parses is kept: required fields, types, enums, patterns
and the ``mode="before"`` validators that repair ``null``. A response these refuse is one Dify
refuses.
"""

from __future__ import annotations

import binascii
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

T = TypeVar("T")


class BasicResponse(BaseModel, Generic[T]):
    code: int
    message: str
    data: T | None = None


class I18nObject(BaseModel):
    en_US: str
    zh_Hans: str | None = None
    pt_BR: str | None = None
    ja_JP: str | None = None


class ToolLabel(StrEnum):  # ToolLabelEnum
    SEARCH = "search"
    IMAGE = "image"
    VIDEOS = "videos"
    WEATHER = "weather"
    FINANCE = "finance"
    DESIGN = "design"
    TRAVEL = "travel"
    SOCIAL = "social"
    NEWS = "news"
    MEDICAL = "medical"
    PRODUCTIVITY = "productivity"
    EDUCATION = "education"
    BUSINESS = "business"
    ENTERTAINMENT = "entertainment"
    UTILITIES = "utilities"
    AGENT = "agent"
    OTHER = "other"


PARAMETER_TYPES = [
    "string",
    "number",
    "boolean",
    "select",
    "secret-input",
    "file",
    "files",
    "app-selector",
    "model-selector",
    "tools-selector",
    "any",
    "dynamic-select",
    "dynamic-tree-select",
    "checkbox",
    "system-files",
    "array",
    "object",
]
ParameterType = StrEnum("ParameterType", {t.upper().replace("-", "_"): t for t in PARAMETER_TYPES})


class ParameterOption(BaseModel):  # PluginParameterOption
    value: str
    label: I18nObject
    icon: str | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _str(cls, v: Any) -> str:
        return v if isinstance(v, str) else str(v)


class PluginParameter(BaseModel):
    name: str
    label: I18nObject
    placeholder: I18nObject | None = None
    scope: str | None = None
    auto_generate: dict[str, Any] | None = None
    template: dict[str, Any] | None = None
    required: bool = False
    multiple: bool = False
    default: float | int | str | bool | list[Any] | dict[str, Any] | None = None
    min: float | int | None = None
    max: float | int | None = None
    precision: int | None = None
    options: list[ParameterOption] = Field(default_factory=list)

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        return v if isinstance(v, list) else []


class ToolParameterForm(StrEnum):
    SCHEMA = "schema"
    FORM = "form"
    LLM = "llm"


class ToolParameter(PluginParameter):
    type: ParameterType  # type: ignore[valid-type]
    human_description: I18nObject | None = None
    form: ToolParameterForm
    llm_description: str | None = None


class ToolProviderIdentity(BaseModel):
    author: str
    name: str
    description: I18nObject
    icon: str
    icon_dark: str | None = None
    label: I18nObject
    tags: list[ToolLabel] | None = []


class ToolIdentity(BaseModel):
    author: str
    name: str
    label: I18nObject
    provider: str
    icon: str | None = None


class ToolDescription(BaseModel):
    human: I18nObject
    llm: str


class ToolEntity(BaseModel):
    identity: ToolIdentity
    parameters: list[ToolParameter] = Field(default_factory=list)
    description: ToolDescription | None = None
    output_schema: Mapping[str, Any] = Field(default_factory=dict)
    has_runtime_parameters: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return v or []

    @field_validator("output_schema", mode="before")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        return v or {}


class ProviderConfigType(StrEnum):
    SECRET_INPUT = "secret-input"
    TEXT_INPUT = "text-input"
    SELECT = "select"
    BOOLEAN = "boolean"
    APP_SELECTOR = "app-selector"
    MODEL_SELECTOR = "model-selector"
    TOOLS_SELECTOR = "tools-selector"


class ProviderConfig(BaseModel):
    type: ProviderConfigType
    name: str
    scope: str | None = None
    required: bool = False
    default: int | str | float | bool | None = None
    options: list[ParameterOption] | None = None
    label: I18nObject | None = None
    help: I18nObject | None = None
    url: str | None = None
    placeholder: I18nObject | None = None


class ToolProviderEntity(BaseModel):
    identity: ToolProviderIdentity
    plugin_id: str | None = None
    credentials_schema: list[ProviderConfig] = Field(default_factory=list)
    oauth_schema: dict[str, Any] | None = None


class ToolProviderEntityWithPlugin(ToolProviderEntity):
    tools: list[ToolEntity] = Field(default_factory=list)


class PluginToolProviderEntity(BaseModel):
    provider: str
    plugin_unique_identifier: str
    plugin_id: str
    declaration: ToolProviderEntityWithPlugin


class ModelType(StrEnum):
    LLM = "llm"
    TEXT_EMBEDDING = "text-embedding"
    RERANK = "rerank"
    SPEECH2TEXT = "speech2text"
    MODERATION = "moderation"
    TTS = "tts"


class ConfigurateMethod(StrEnum):
    PREDEFINED_MODEL = "predefined-model"
    CUSTOMIZABLE_MODEL = "customizable-model"


class ModelFeature(StrEnum):
    TOOL_CALL = "tool-call"
    MULTI_TOOL_CALL = "multi-tool-call"
    AGENT_THOUGHT = "agent-thought"
    VISION = "vision"
    STREAM_TOOL_CALL = "stream-tool-call"
    DOCUMENT = "document"
    VIDEO = "video"
    AUDIO = "audio"
    STRUCTURED_OUTPUT = "structured-output"
    POLLING = "polling"


class ModelPropertyKey(StrEnum):
    MODE = "mode"
    CONTEXT_SIZE = "context_size"
    MAX_CHUNKS = "max_chunks"
    FILE_UPLOAD_LIMIT = "file_upload_limit"
    SUPPORTED_FILE_EXTENSIONS = "supported_file_extensions"
    MAX_CHARACTERS_PER_CHUNK = "max_characters_per_chunk"
    DEFAULT_VOICE = "default_voice"
    VOICES = "voices"
    WORD_LIMIT = "word_limit"
    AUDIO_TYPE = "audio_type"
    MAX_WORKERS = "max_workers"


class RuleType(StrEnum):  # ParameterType of the model runtime
    FLOAT = "float"
    INT = "int"
    STRING = "string"
    BOOLEAN = "boolean"
    TEXT = "text"


class ParameterRule(BaseModel):
    name: str
    use_template: str | None = None
    label: I18nObject
    type: RuleType
    help: I18nObject | None = None
    required: bool = False
    default: Any | None = None
    min: float | None = None
    max: float | None = None
    precision: int | None = None
    options: list[str] = []


class AIModelEntity(BaseModel):
    model: str
    label: I18nObject
    model_type: ModelType
    features: list[ModelFeature] | None = None
    fetch_from: ConfigurateMethod
    model_properties: dict[ModelPropertyKey, Any]
    deprecated: bool = False
    parameter_rules: list[ParameterRule] = []
    pricing: dict[str, Any] | None = None
    model_config = ConfigDict(protected_namespaces=())


class FormType(StrEnum):
    TEXT_INPUT = "text-input"
    SECRET_INPUT = "secret-input"
    SELECT = "select"
    RADIO = "radio"
    SWITCH = "switch"


class FormShowOn(BaseModel):
    variable: str
    value: str


class FormOption(BaseModel):
    label: I18nObject
    value: str
    show_on: list[FormShowOn] = []


class CredentialFormSchema(BaseModel):
    variable: str
    label: I18nObject
    type: FormType
    required: bool = True
    default: str | None = None
    options: list[FormOption] | None = None
    placeholder: I18nObject | None = None
    max_length: int = 0
    show_on: list[FormShowOn] = []


class ProviderCredentialSchema(BaseModel):
    credential_form_schemas: list[CredentialFormSchema]


class ProviderEntity(BaseModel):
    provider: str
    label: I18nObject
    description: I18nObject | None = None
    icon_small: I18nObject | None = None
    icon_large: I18nObject | None = None
    background: str | None = None
    help: dict[str, Any] | None = None
    supported_model_types: list[ModelType]
    configurate_methods: list[ConfigurateMethod]
    models: list[AIModelEntity] = Field(default_factory=list)
    provider_credential_schema: ProviderCredentialSchema | None = None
    model_credential_schema: dict[str, Any] | None = None
    position: dict[str, list[str]] | None = {}
    model_config = ConfigDict(protected_namespaces=())

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return v or []


class PluginModelProviderEntity(BaseModel):
    id: str
    created_at: datetime.datetime
    updated_at: datetime.datetime
    provider: str
    tenant_id: str
    plugin_unique_identifier: str
    plugin_id: str
    declaration: ProviderEntity


class AgentStrategyParameter(PluginParameter):
    type: ParameterType  # type: ignore[valid-type]
    help: I18nObject | None = None


class AgentStrategyEntity(BaseModel):
    identity: ToolIdentity
    parameters: list[AgentStrategyParameter] = Field(default_factory=list)
    description: I18nObject
    output_schema: dict[str, Any] | None = None
    features: list[str] | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return v or []


class AgentStrategyProviderEntity(BaseModel):
    identity: ToolProviderIdentity
    plugin_id: str | None = None


class AgentProviderEntityWithPlugin(AgentStrategyProviderEntity):
    strategies: list[AgentStrategyEntity] = Field(default_factory=list)


class DeclarationMeta(BaseModel):  # PluginDeclaration.Meta
    minimum_dify_version: str | None = None
    version: str | None = None

    @field_validator("minimum_dify_version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None:
            Version(v)
        return v


class PluginAgentProviderEntity(BaseModel):
    provider: str
    plugin_unique_identifier: str
    plugin_id: str
    declaration: AgentProviderEntityWithPlugin
    meta: DeclarationMeta


class OAuthSchema(BaseModel):
    client_schema: list[ProviderConfig] = Field(default_factory=list)
    credentials_schema: list[ProviderConfig] = Field(default_factory=list)


class DatasourceProviderType(StrEnum):
    ONLINE_DOCUMENT = "online_document"
    LOCAL_FILE = "local_file"
    WEBSITE_CRAWL = "website_crawl"
    ONLINE_DRIVE = "online_drive"


class DatasourceParameterType(StrEnum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    SELECT = "select"
    SECRET_INPUT = "secret-input"
    FILE = "file"
    FILES = "files"
    SYSTEM_FILES = "system-files"


class DatasourceParameter(PluginParameter):
    type: DatasourceParameterType
    description: I18nObject


class DatasourceIdentity(BaseModel):
    author: str
    name: str
    label: I18nObject
    provider: str  # set by the client's transformer
    icon: str | None = None


class DatasourceEntity(BaseModel):
    identity: DatasourceIdentity
    parameters: list[DatasourceParameter] = Field(default_factory=list)
    description: I18nObject
    output_schema: dict[str, Any] | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return v or []


class DatasourceProviderIdentity(BaseModel):
    author: str
    name: str
    description: I18nObject
    icon: str
    label: I18nObject
    tags: list[ToolLabel] | None = []


class DatasourceProviderEntity(BaseModel):
    identity: DatasourceProviderIdentity
    credentials_schema: list[ProviderConfig] = Field(default_factory=list)
    oauth_schema: OAuthSchema | None = None
    provider_type: DatasourceProviderType


class DatasourceProviderEntityWithPlugin(DatasourceProviderEntity):
    datasources: list[DatasourceEntity] = Field(default_factory=list)


class PluginDatasourceProviderEntity(BaseModel):
    provider: str
    plugin_unique_identifier: str
    plugin_id: str
    is_authorized: bool = False
    declaration: DatasourceProviderEntityWithPlugin


class EventParameterType(StrEnum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    SELECT = "select"
    FILE = "file"
    FILES = "files"
    MODEL_SELECTOR = "model-selector"
    APP_SELECTOR = "app-selector"
    OBJECT = "object"
    ARRAY = "array"
    DYNAMIC_SELECT = "dynamic-select"
    CHECKBOX = "checkbox"


class EventParameter(BaseModel):
    name: str
    label: I18nObject
    type: EventParameterType
    auto_generate: dict[str, Any] | None = None
    template: dict[str, Any] | None = None
    scope: str | None = None
    required: bool | None = False
    multiple: bool | None = False
    default: int | float | str | list[Any] | None = None
    min: float | int | None = None
    max: float | int | None = None
    precision: int | None = None
    options: list[ParameterOption] | None = None
    description: I18nObject | None = None


class TriggerProviderIdentity(BaseModel):
    author: str
    name: str
    label: I18nObject
    description: I18nObject
    icon: str | None = None
    icon_dark: str | None = None
    tags: list[str] = Field(default_factory=list)


class EventIdentity(BaseModel):
    author: str
    name: str
    label: I18nObject
    provider: str | None = None


class EventEntity(BaseModel):
    identity: EventIdentity
    parameters: list[EventParameter] = Field(default_factory=list)
    description: I18nObject
    output_schema: Mapping[str, Any] | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return v or []


class SubscriptionConstructor(BaseModel):
    parameters: list[EventParameter] = Field(default_factory=list)
    credentials_schema: list[ProviderConfig] = Field(default_factory=list)
    oauth_schema: OAuthSchema | None = None


class TriggerProviderEntity(BaseModel):
    identity: TriggerProviderIdentity
    subscription_schema: list[ProviderConfig] = Field(default_factory=list)
    subscription_constructor: SubscriptionConstructor | None = None
    events: list[EventEntity] = Field(default_factory=list)


class PluginTriggerProviderEntity(BaseModel):
    provider: str
    plugin_unique_identifier: str
    plugin_id: str
    declaration: TriggerProviderEntity


class PluginCategory(StrEnum):
    TOOL = "tool"
    MODEL = "model"
    EXTENSION = "extension"
    AGENT_STRATEGY = "agent-strategy"
    DATASOURCE = "datasource"
    TRIGGER = "trigger"


class Resource(BaseModel):
    memory: int
    permission: dict[str, Any] | None = None


class DeclaredPlugins(BaseModel):
    tools: list[str] | None = Field(default_factory=list)
    models: list[str] | None = Field(default_factory=list)
    endpoints: list[str] | None = Field(default_factory=list)
    datasources: list[str] | None = Field(default_factory=list)
    triggers: list[str] | None = Field(default_factory=list)


class PluginDeclaration(BaseModel):
    version: str
    author: str | None = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    name: str = Field(..., pattern=r"^[a-z0-9_-]{1,128}$")
    description: I18nObject
    icon: str
    icon_dark: str | None = None
    label: I18nObject
    category: PluginCategory
    created_at: datetime.datetime
    resource: Resource
    plugins: DeclaredPlugins
    tags: list[str] = Field(default_factory=list)
    repo: str | None = None
    verified: bool = False
    tool: ToolProviderEntity | None = None  # the provider only: Dify does not parse its tools here
    model: ProviderEntity | None = None
    agent_strategy: AgentStrategyProviderEntity | None = None
    endpoint: EndpointProviderDeclaration | None = None
    datasource: DatasourceProviderEntity | None = None  # the provider only, as for tools
    meta: DeclarationMeta

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        Version(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _category(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, category in (
            ("tool", "tool"),
            ("model", "model"),
            ("datasource", "datasource"),
            ("agent_strategy", "agent-strategy"),
            ("trigger", "trigger"),
        ):
            if values.get(key):
                values["category"] = category
                break
        else:
            values["category"] = "extension"
        return values


class InstallationSource(StrEnum):
    GITHUB = "github"
    MARKETPLACE = "marketplace"
    PACKAGE = "package"
    REMOTE = "remote"


class BasePluginEntity(BaseModel):
    id: str
    created_at: datetime.datetime
    updated_at: datetime.datetime


class PluginInstallation(BasePluginEntity):
    tenant_id: str
    endpoints_setups: int
    endpoints_active: int
    runtime_type: str
    source: InstallationSource
    meta: Mapping[str, Any]
    plugin_id: str
    plugin_unique_identifier: str
    version: str
    checksum: str
    declaration: PluginDeclaration


class PluginEntity(PluginInstallation):
    name: str
    installation_id: str


class PluginListResponse(BaseModel):
    list: list[PluginEntity]
    total: int


class InstalledIds(BaseModel):
    plugin_ids: list[str]


class MissingPluginDependency(BaseModel):
    plugin_unique_identifier: str
    current_identifier: str | None = None


class AuthorizedCategory(StrEnum):
    LANGGENIUS = "langgenius"
    PARTNER = "partner"
    COMMUNITY = "community"


class PluginVerification(BaseModel):
    authorized_category: AuthorizedCategory


class PluginDecodeResponse(BaseModel):
    unique_identifier: str
    manifest: PluginDeclaration
    verification: PluginVerification | None = None


class PluginInstallTaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


class PluginInstallTaskPluginStatus(BaseModel):
    plugin_unique_identifier: str
    plugin_id: str
    status: PluginInstallTaskStatus
    message: str
    icon: str
    labels: I18nObject
    source: str | None = None


class PluginInstallTask(BasePluginEntity):
    status: PluginInstallTaskStatus
    total_plugins: int
    completed_plugins: int
    plugins: list[PluginInstallTaskPluginStatus]


class PluginInstallTaskStartResponse(BaseModel):
    all_installed: bool
    task_id: str


# ``api/core/plugin/entities/endpoint.py`` (over ``BasePluginEntity`` of ``base.py``): what
# ``PluginEndpointClient.list_endpoints`` and ``list_endpoints_for_single_plugin`` parse.
ENDPOINT_URL_TEMPLATE = "http://localhost:5002/e/{hook_id}"  # Dify's default setting


class EndpointDeclaration(BaseModel):
    path: str
    method: str
    hidden: bool = Field(default=False)


class EndpointProviderDeclaration(BaseModel):
    settings: list[ProviderConfig] = Field(default_factory=list)
    endpoints: list[EndpointDeclaration] | None = Field(default_factory=list)


class EndpointEntity(BaseModel):
    id: str
    created_at: datetime.datetime
    updated_at: datetime.datetime
    settings: dict[str, Any]
    tenant_id: str
    plugin_id: str
    expired_at: datetime.datetime
    declaration: EndpointProviderDeclaration = Field(default_factory=EndpointProviderDeclaration)


class EndpointEntityWithInstance(EndpointEntity):
    name: str
    enabled: bool
    url: str
    hook_id: str

    @model_validator(mode="before")
    @classmethod
    def _url(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "url" not in values:
            values["url"] = ENDPOINT_URL_TEMPLATE.replace("{hook_id}", values["hook_id"])
        return values


class LLMPollingStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class LLMPollingResult(BaseModel):
    """What a polling start or check answers (``LLMPollingResult`` in langgenius/graphon's
    ``model_runtime/entities/llm_entities.py``, which Dify's model runtime uses). ``result`` is
    an ``LLMResult``; only its required fields are checked here."""

    status: LLMPollingStatus
    plugin_state: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    next_check_after_seconds: int | None = Field(default=None, ge=1, strict=True)
    expires_after_seconds: int | None = Field(default=None, ge=1, strict=True)
    max_attempts: int | None = Field(default=None, ge=1, strict=True)

    @model_validator(mode="after")
    def _status_payload(self) -> LLMPollingResult:
        if self.status == LLMPollingStatus.RUNNING and not self.plugin_state:
            raise ValueError("plugin_state is required when polling status is running.")
        if self.status == LLMPollingStatus.SUCCEEDED:
            if self.result is None:
                raise ValueError("result is required when polling status is succeeded.")
            missing = {"model", "message", "usage"} - set(self.result)
            if missing:
                raise ValueError(f"the LLMResult lacks {sorted(missing)}")
        if self.status == LLMPollingStatus.FAILED and not (self.error or "").strip():
            raise ValueError("error is required when polling status is failed.")
        return self


class WebSiteInfoDetail(BaseModel):
    source_url: str
    content: str
    title: str
    description: str


class WebSiteInfo(BaseModel):
    status: str | None
    web_info_list: list[WebSiteInfoDetail] | None = []
    total: int | None = 0
    completed: int | None = 0


class WebsiteCrawlMessage(BaseModel):
    """One message of a ``datasource/get_website_crawl`` stream."""

    result: WebSiteInfo = WebSiteInfo(status="", web_info_list=[], total=0, completed=0)


class TriggerInvokeEventResponse(BaseModel):
    variables: Mapping[str, Any] = Field(default_factory=dict)
    cancelled: bool = False

    @field_validator("variables", mode="before")
    @classmethod
    def _variables(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value


@dataclass
class RawHTTPResponse:
    """The webhook answer Dify rebuilds from the plugin's hex: status, headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> RawHTTPResponse:
        """Headers end at the first blank line (CRLF, else LF); the status is the status line's
        second word; a header line without a colon is skipped."""
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            head, _, body = raw.partition(b"\n\n")
        lines = head.split(b"\r\n")
        if len(lines) == 1 and b"\n" in lines[0]:
            lines = head.split(b"\n")
        if not lines[0]:
            raise ValueError("Empty HTTP response")
        parts = lines[0].decode("utf-8", errors="ignore").split(" ", 2)
        if len(parts) < 2:
            raise ValueError(f"Invalid status line: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.decode("utf-8", errors="ignore").partition(":")
            if colon:
                headers[name] = value.strip()
        return cls(int(parts[1]), headers, body)


class TriggerDispatchResponse(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    user_id: str
    events: list[str]
    response: RawHTTPResponse
    payload: Mapping[str, Any] = Field(default_factory=dict)

    @field_validator("response", mode="before")
    @classmethod
    def _response(cls, value: Any) -> RawHTTPResponse:
        try:
            return RawHTTPResponse.parse(binascii.unhexlify(value.encode()))
        except Exception as exc:
            raise ValueError("Failed to deserialize response from hex string") from exc


class PluginBasicBooleanResponse(BaseModel):
    """A ``validate_credentials`` answer."""

    result: bool
    credentials: dict[str, Any] | None = None


class TriggerSubscriptionResponse(BaseModel):
    """What ``subscribe``, ``refresh`` and ``unsubscribe`` answer."""

    subscription: dict[str, Any]


class Subscription(BaseModel):
    """The trigger ``Subscription`` Dify stores from a ``subscribe`` or ``refresh`` answer."""

    expires_at: int
    endpoint: str
    parameters: Mapping[str, Any] | None = None
    properties: Mapping[str, Any]
