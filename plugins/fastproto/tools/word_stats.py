"""word_stats without the SDK: must stay identical to text_toolkit's (conformance tests)."""

from __future__ import annotations

from typing import Any

from wire import Session, ToolStream

# Punctuation trimmed from both ends of a word; text_toolkit uses the same rule.
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


def invoke(session: Session, params: dict[str, Any]) -> ToolStream:
    """Summary text, json object, then the variables words, unique, top_word."""
    words, unique, top = count_words(str(params.get("text") or ""))
    yield "text", {"text": f"{words} words, {unique} unique"}
    yield "json", {"json_object": {"words": words, "unique": unique, "top": top}}
    yield "variable", {"variable_name": "words", "variable_value": words, "stream": False}
    yield "variable", {"variable_name": "unique", "variable_value": unique, "stream": False}
    top_word = top[0][0] if top else ""
    yield "variable", {"variable_name": "top_word", "variable_value": top_word, "stream": False}
