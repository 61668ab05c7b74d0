"""The dispatch path: the table of kinds Dify calls, and the checks every request passes."""

from daemon.dispatch.kinds import KINDS, Kind
from daemon.dispatch.request import (
    BadRequest,
    InvokeToolRequest,
    Prepared,
    ValidateCredentialsRequest,
    check_key,
    parse,
    plugin_id,
    prepare,
    read_json,
    tenant_id,
)

__all__ = [
    "KINDS",
    "BadRequest",
    "InvokeToolRequest",
    "Kind",
    "Prepared",
    "ValidateCredentialsRequest",
    "check_key",
    "parse",
    "plugin_id",
    "prepare",
    "read_json",
    "tenant_id",
]
