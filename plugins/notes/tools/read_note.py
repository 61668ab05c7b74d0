"""read_note: `exist` then `get`, since a daemon may answer `get` of a missing key with an error."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class ReadNoteTool(Tool):
    """Reports the body, or that no such note exists, without raising."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        title = str(tool_parameters.get("title") or "")
        key = f"note:{title}"
        body = ""
        found = bool(self.session.storage.exist(key))
        if found:
            body = self.session.storage.get(key).decode("utf-8")
        yield self.create_text_message(body if found else f"no note named {title}")
        yield self.create_variable_message("found", found)
        yield self.create_variable_message("body", body)
