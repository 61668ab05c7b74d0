"""The received event: the body, or the one field asked for (an event without it is ignored)."""

from collections.abc import Mapping
from typing import Any

from dify_plugin.entities.trigger import Variables
from dify_plugin.errors.trigger import EventIgnoreError
from dify_plugin.interfaces.trigger import Event
from werkzeug import Request


class ReceivedEvent(Event):
    def _on_event(
        self, request: Request, parameters: Mapping[str, Any], payload: Mapping[str, Any]
    ) -> Variables:
        field = parameters.get("field")
        if not field:
            return Variables(variables=dict(payload))
        if field not in payload:
            raise EventIgnoreError(f"no {field} in this event")
        return Variables(variables={field: payload[field]})
