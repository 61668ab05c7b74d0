"""save_note: one storage `set` round trip per call."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


def note_key(title: str) -> str:
    """All notes share one prefix so they never collide with other keys."""
    return f"note:{title}"


class SaveNoteTool(Tool):
    """Overwrites the note; storage values are bytes, so the body is UTF-8 encoded."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        title = str(tool_parameters.get("title") or "")
        body = str(tool_parameters.get("body") or "")
        self.session.storage.set(note_key(title), body.encode("utf-8"))
        yield self.create_text_message(f"saved {title}")
        yield self.create_variable_message("saved", True)
