"""What each load scenario's event stream must be, and how a stream that differs failed.

A load run must not hide failures, but it must also tell the known race of the
``lock`` and ``unsafe`` designs apart from everything else. So every failure is one
of two kinds:

* :class:`WrongVerdict` — the stream is complete, but the validation verdict is not
  the one the output deserves (a valid output reported invalid, the wrong rule, an
  invalid output passed, a validation crash);
* :class:`BrokenStream` — anything else: lost, extra or changed events, an error
  that was not expected, an HTTP error, a connection that broke.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.testing import Event

VALIDATION_ERROR = "ToolOutputValidationError"
VALIDATION_TYPES = frozenset({VALIDATION_ERROR, "ToolOutputValidationCrash"})
PATTERN = "abcdefghijklmnopqrstuvwxyz"


class LoadFailure(AssertionError):
    """A stream that is not what the scenario expects; ``kind`` names the class of failure."""

    kind = "failure"


class WrongVerdict(LoadFailure):
    kind = "wrong verdict"


class BrokenStream(LoadFailure):
    kind = "broken stream"


@dataclass(frozen=True)
class Expect:
    """Tool messages, then either a clean end or exactly one final error event.

    ``messages`` is the exact list of tool messages; without it ``count`` is their
    number (None: at least one, for clients that leave early). ``variables`` is the
    variable map the messages must build. ``error_type`` and ``message`` (exact) or
    ``message_part`` (a substring) describe the final error, if one is due.
    """

    messages: tuple[Mapping[str, Any], ...] | None = None
    count: int | None = None
    variables: Mapping[str, Any] | None = None
    error_type: str | None = None
    message: str | None = None
    message_part: str | None = None

    def check(self, events: Sequence[Event]) -> None:
        """Raise a :class:`LoadFailure` unless ``events`` is what this scenario must produce."""
        if not events:
            raise BrokenStream("no events")
        final = events[-1] if not events[-1].ok else None
        tools = events[:-1] if final is not None else events
        if any(not e.ok for e in tools):
            raise BrokenStream("an error event before the last event")
        error = final.error if final is not None else {}
        got_type, got_message = error.get("error_type"), error.get("message", "")
        matched = final is not None and self._matches(got_type, got_message)
        if final is not None and not matched and got_type not in VALIDATION_TYPES:
            raise BrokenStream(f"unexpected final error {got_type}: {got_message} ({self._expected()})")
        self._check_messages([e.message for e in tools])
        if matched:
            return
        if final is None:
            if self.error_type in VALIDATION_TYPES:
                raise WrongVerdict("invalid output passed validation")
            if self.error_type is not None:
                raise BrokenStream(f"ended cleanly ({self._expected()})")
            return
        # A validation error where none, or another one, was due.
        if self.error_type is None:
            raise WrongVerdict(f"valid output reported invalid: {got_type}: {got_message}")
        if self.error_type == VALIDATION_ERROR:
            raise WrongVerdict(f"wrong verdict: {got_type}: {got_message}")
        raise BrokenStream(f"unexpected final error {got_type}: {got_message} ({self._expected()})")

    def _expected(self) -> str:
        if self.error_type is None:
            return "expected no error"
        return f"expected {self.error_type}: {self.message or self.message_part}"

    def _matches(self, error_type: Any, message: str) -> bool:
        if self.error_type is None or error_type != self.error_type:
            return False
        if self.message is not None:
            return message == self.message
        return self.message_part is None or self.message_part in message

    def _check_messages(self, messages: list[Any]) -> None:
        if self.messages is not None and messages != list(self.messages):
            raise BrokenStream(f"tool messages differ from the {len(self.messages)} expected")
        if self.count is not None and len(messages) != self.count:
            raise BrokenStream(f"{len(messages)} tool messages, expected {self.count}")
        if self.count is None and self.messages is None and not messages:
            raise BrokenStream("no tool message")
        if self.variables is not None and built_variables(messages) != dict(self.variables):
            raise BrokenStream("the variable messages do not build the expected variables")


def built_variables(messages: Sequence[Any]) -> dict[str, Any]:
    """The variable map a caller builds from the stream (``stream: true`` appends)."""
    variables: dict[str, Any] = {}
    for m in messages:
        if isinstance(m, Mapping) and m.get("type") == "variable":
            body = m["message"]
            name, value = body["variable_name"], body["variable_value"]
            variables[name] = variables.get(name, "") + value if body.get("stream") else value
    return variables


def tool_message(kind: str, message: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": dict(message), "meta": None}


def variable(name: str, value: Any, stream: bool = False) -> dict[str, Any]:
    return tool_message("variable", {"variable_name": name, "variable_value": value, "stream": stream})


def fastproto_emit(
    count: int = 1,
    size: int = 16,
    variables: int = 0,
    stream_chunks: int = 0,
    violate: bool = False,
    error_at: int | None = None,
) -> tuple[dict[str, Any], Expect]:
    """fastproto ``emit`` parameters and the stream they must produce (see its README)."""
    pad = (PATTERN * (size // len(PATTERN) + 1))[:size]
    messages = (
        [tool_message("text", {"text": pad}) for _ in range(count)]
        + [variable(f"var_{i}", i) for i in range(variables)]
        + [variable("streamed", f"c{i};", stream=True) for i in range(stream_chunks)]
        + [variable("done", "not-a-bool" if violate else True)]
    )
    params: dict[str, Any] = {"count": count, "size": size, "variables": variables}
    params |= {"stream_chunks": stream_chunks, "violate": violate}
    if error_at is not None:
        params["error_at"] = error_at
        message = f"fastproto error at message {error_at}"
        return params, Expect(tuple(messages[:error_at]), error_type="RuntimeError", message=message)
    if violate:
        message = "output variable 'done' failed 'type': \"not-a-bool\" is not of type \"boolean\""
        return params, Expect(tuple(messages), error_type=VALIDATION_ERROR, message=message)
    return params, Expect(tuple(messages))
