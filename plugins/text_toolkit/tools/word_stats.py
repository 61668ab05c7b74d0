"""word_stats: the reference tool for conformance tests (fastproto must match it exactly)."""

from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage

# Punctuation trimmed from both ends of a word; fastproto uses the same rule.
PUNCTUATION = ".,;:!?\"'()[]{}<>-_*/\\`~"


def count_words(text: str) -> tuple[int, int, list[list[Any]]]:
    """Split on whitespace, lowercase, trim punctuation; ties keep first-seen order."""
    counts: dict[str, int] = {}
    total = 0
    for raw in text.lower().split():
        word = raw.strip(PUNCTUATION)
        if word:
            total += 1
            counts[word] = counts.get(word, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:3]
    return total, len(counts), [[word, n] for word, n in top]


class WordStatsTool(Tool):
    """Emits a summary text, a json object, then the three output variables."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        text = str(tool_parameters.get("text") or "")
        words, unique, top = count_words(text)
        yield self.create_text_message(f"{words} words, {unique} unique")
        yield self.create_json_message({"words": words, "unique": unique, "top": top})
        yield self.create_variable_message("words", words)
        yield self.create_variable_message("unique", unique)
        yield self.create_variable_message("top_word", top[0][0] if top else "")
