"""delete_note: `exist` then `del`, so deleting a missing note is a clean `deleted: false`."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class DeleteNoteTool(Tool):
    """Deletes the note if present and says whether it did."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        title = str(tool_parameters.get("title") or "")
        key = f"note:{title}"
        deleted = bool(self.session.storage.exist(key))
        if deleted:
            self.session.storage.delete(key)
        yield self.create_text_message(f"deleted {title}" if deleted else f"no note named {title}")
        yield self.create_variable_message("deleted", deleted)
