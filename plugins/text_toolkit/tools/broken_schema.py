"""broken_schema: violates its own output_schema so a validating daemon must object."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class BrokenSchemaTool(Tool):
    """Emits `score` (default 250) although the schema allows only 0..100."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        raw = tool_parameters.get("score")
        score = int(float(250 if raw is None else raw))
        yield self.create_text_message("scoring done")
        yield self.create_variable_message("score", score)
