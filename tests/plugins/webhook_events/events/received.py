"""The received event: the body, or the one field asked for."""

from collections.abc import Mapping
from typing import Any

from dify_plugin.entities.trigger import Variables
from dify_plugin.interfaces.trigger import Event
from werkzeug import Request


class ReceivedEvent(Event):
    def _on_event(
        self, request: Request, parameters: Mapping[str, Any], payload: Mapping[str, Any]
    ) -> Variables:
        field = parameters.get("field")
        return Variables(variables={field: payload.get(field)} if field else dict(payload))
