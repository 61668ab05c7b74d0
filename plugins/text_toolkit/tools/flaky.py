"""flaky: fails mid-stream so the daemon sees stream messages, then error, then end."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class FlakyTool(Tool):
    """Emits `fail_after` steps and then raises."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        raw = tool_parameters.get("fail_after")
        steps = max(0, int(float(2 if raw is None else raw)))
        for i in range(1, steps + 1):
            yield self.create_text_message(f"step {i}")
        raise RuntimeError(f"flaky tool gave up after {steps} steps")
