"""story: streams a deterministic story so tests can check stream:true concatenation."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage

TEMPLATES = (
    "Once upon a time there was a {topic}.",
    "Every morning the {topic} went looking for something new.",
    "One day the {topic} found a door nobody had opened.",
    "Behind it waited a friend who had been lonely for years.",
    "From then on the {topic} was never bored again.",
)


class StoryTool(Tool):
    """One stream:true chunk per word, then the sentence count as a plain variable."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        topic = str(tool_parameters.get("topic") or "fox")
        raw = tool_parameters.get("sentences")
        count = max(1, int(float(3 if raw in (None, "") else raw)))
        first = True
        for i in range(count):
            sentence = TEMPLATES[i % len(TEMPLATES)].format(topic=topic)
            for word in sentence.split(" "):
                yield self.create_stream_variable_message("story", word if first else " " + word)
                first = False
        yield self.create_variable_message("sentences", count)
