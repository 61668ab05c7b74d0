"""Output validation: the compiled schema, applying variables, and the three designs.

The race tests drive a real :class:`Session` from a real producer thread, the way
the instance's reader thread does, with a consumer that lags behind on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from daemon.config import ValidatorDesign
from daemon.errors import (
    CLIENT_GONE,
    VALIDATION_CRASH,
    VALIDATION_ERROR,
    VARIABLE_ERROR,
    SessionError,
)
from daemon.session import Session
from daemon.validation import (
    DESIGNS,
    OutputSchema,
    SchemaDeclarationError,
    VariableMessageError,
    apply_variable,
    joined,
)
from tests import strategies

SCHEMA = OutputSchema(
    {
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "streamed": {"type": "string"}},
        "patternProperties": {"^var_[0-9]+$": {"type": "integer"}},
        "required": ["done"],
    }
)


def variable(name: str, value: Any, stream: bool = False) -> dict[str, Any]:
    return {
        "type": "variable",
        "message": {"variable_name": name, "variable_value": value, "stream": stream},
        "meta": None,
    }


def plugin_output(n: int) -> list[dict[str, Any]]:
    """What fastproto's ``emit`` sends: n variables, streamed chunks, then ``done``."""
    return (
        [variable(f"var_{i}", i) for i in range(n)]
        + [variable("streamed", f"c{i};", stream=True) for i in range(n)]
        + [variable("done", True)]
    )


def test_schema_errors_name_the_variable_and_the_rule() -> None:
    assert SCHEMA.check({"done": True, "var_1": 1}) is None
    assert SCHEMA.check({"done": "yes"}) == (
        "output variable 'done' failed 'type': 'yes' is not of type 'boolean'"
    )
    assert SCHEMA.check({"var_3": 3}) == (
        "output variable 'done' failed 'required': 'done' is a required property"
    )


def test_an_invalid_declared_schema_is_refused_at_load() -> None:
    with pytest.raises(SchemaDeclarationError, match="invalid output_schema"):
        OutputSchema({"type": "object", "properties": {"x": {"type": "no-such-type"}}})


def test_streamed_chunks_append_and_plain_values_replace() -> None:
    variables: dict[str, Any] = {}
    for message in plugin_output(3):
        apply_variable(variables, message["message"])
    assert joined(variables) == {"var_0": 0, "var_1": 1, "var_2": 2, "streamed": "c0;c1;c2;", "done": True}
    apply_variable(variables, {"variable_name": "var_0", "variable_value": 9, "stream": False})
    assert variables["var_0"] == 9


def test_a_streamed_chunk_must_be_a_string() -> None:
    with pytest.raises(VariableMessageError, match="'streamed'"):
        apply_variable({}, {"variable_name": "streamed", "variable_value": 5, "stream": True})


def new_session(design: ValidatorDesign, schema: OutputSchema = SCHEMA) -> Session:
    return Session(
        "s",
        asyncio.get_running_loop(),
        buffer_bytes=10**9,
        variables=DESIGNS[design](schema),
        tenant_id="t",
        plugin_id="p/q",
    )


async def consume(session: Session) -> tuple[int, SessionError | None]:
    count = 0
    try:
        while batch := await session.next_batch():
            count += len(batch)
    except SessionError as error:
        return count, error
    return count, None


def run_lagging_consumer(
    design: ValidatorDesign, n: int = 20, schema: OutputSchema = SCHEMA
) -> tuple[Session, int, SessionError | None]:
    """The reader thread delivers everything and ``end`` before the consumer runs at all."""

    async def main() -> tuple[Session, int, SessionError | None]:
        session = new_session(design, schema)

        def reader() -> None:
            for message in plugin_output(n):
                session.deliver([message], 100)
            session.finish()

        thread = threading.Thread(target=reader)
        thread.start()
        thread.join()  # the consumer lags: nothing consumed yet
        count, error = await consume(session)
        return session, count, error

    return asyncio.run(main())


def test_owner_validates_once_after_every_variable_even_when_the_consumer_lags() -> None:
    session, count, error = run_lagging_consumer(ValidatorDesign.OWNER)
    assert error is None
    assert count == 41
    assert session.variables is not None
    assert session.variables.validations == 1
    assert session.variables.validated_count == 22  # 20 vars + streamed + done


@pytest.mark.parametrize("design", [ValidatorDesign.LOCK, ValidatorDesign.UNSAFE])
def test_lock_and_unsafe_validate_before_queued_variables_are_applied(design: ValidatorDesign) -> None:
    """The closer validates an empty map although the plugin sent a valid output."""
    session, count, error = run_lagging_consumer(design)
    assert count == 41  # every message still reaches the caller ...
    assert error is not None and error.error_type == VALIDATION_ERROR  # ... with a wrong verdict
    assert "'done' is a required property" in error.message
    assert session.variables is not None and session.variables.validated_count == 0


def test_owner_gives_no_verdict_after_a_plugin_error() -> None:
    async def main() -> tuple[int, SessionError | None, int]:
        session = new_session(ValidatorDesign.OWNER)
        session.deliver(plugin_output(2)[:2], 10)
        threading.Thread(target=session.fail, args=(SessionError("PluginInvokeError", "went wrong"),)).start()
        count, error = await consume(session)
        assert session.variables is not None
        return count, error, session.variables.validations

    count, error, validations = asyncio.run(main())
    assert count == 2
    assert error is not None and error.error_type == "PluginInvokeError"
    assert validations == 0


def test_owner_is_correct_with_many_concurrent_sessions_and_racing_readers() -> None:
    """Many sessions, several producer threads, consumers interleaved on one loop."""

    async def main() -> list[tuple[int, SessionError | None, int]]:
        sessions = [new_session(ValidatorDesign.OWNER) for _ in range(64)]

        def reader(mine: list[Session]) -> None:
            for session in mine:
                for message in plugin_output(30):
                    session.deliver([message], 50)
                session.finish()

        async def consume_slowly(session: Session) -> tuple[int, SessionError | None, int]:
            count = 0
            try:
                while batch := await session.next_batch():
                    count += len(batch)
                    await asyncio.sleep(0)  # a consumer that yields between every batch
            except SessionError as error:
                return count, error, 0
            assert session.variables is not None
            return count, None, session.variables.validations

        consumers = [asyncio.create_task(consume_slowly(s)) for s in sessions]
        threads = [threading.Thread(target=reader, args=(sessions[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        results = await asyncio.gather(*consumers)
        for thread in threads:
            thread.join()
        return results

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        results = asyncio.run(main())
    finally:
        sys.setswitchinterval(old)
    assert results == [(61, None, 1)] * 64


# -- properties: any variable stream, any batching, any race between closers --------------------------

NAMES = st.sampled_from(["done", "streamed", "var_0", "var_12", "other"])
VALUES = strategies.json_values()
TEXT = {"type": "text", "message": {"text": "t"}, "meta": None}
tool_messages = st.one_of(
    st.builds(variable, NAMES, VALUES),
    st.builds(variable, NAMES, st.text(max_size=4), st.just(True)),
    st.builds(variable, NAMES, st.text(max_size=4) | VALUES, st.just(True)),  # sometimes not a string
    st.just(TEXT),
)


def reference(messages: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The variables a stream must build, and whether every message can be applied at all."""
    variables: dict[str, Any] = {}
    for m in messages:
        if m["type"] != "variable":
            continue
        name, value, stream = (
            m["message"]["variable_name"],
            m["message"]["variable_value"],
            m["message"]["stream"],
        )
        if not stream:
            variables[name] = value
        elif not isinstance(value, str):
            return variables, False
        else:
            current = variables.get(name)
            variables[name] = (current if isinstance(current, str) else "") + value
    return variables, True


def split(messages: list[Any], cuts: list[int]) -> list[list[Any]]:
    bounds = sorted({0, len(messages), *(c for c in cuts if c < len(messages))})
    return [messages[a:b] for a, b in itertools.pairwise(bounds)]


def run_session(
    design: ValidatorDesign, batches: list[list[Any]], closers: int = 0
) -> tuple[Session, list[Any], SessionError | None]:
    """A real reader thread delivers ``batches`` then ``end`` while the consumer runs; ``closers``
    more threads close the session as a client that leaves would."""

    async def main() -> tuple[Session, list[Any], SessionError | None]:
        session = new_session(design)

        def reader() -> None:
            for batch in batches:
                session.deliver(batch, 10)
            session.finish()

        def client_gone() -> None:
            session.close(SessionError(CLIENT_GONE, "the client disconnected"))

        threads = [threading.Thread(target=reader)]
        threads += [threading.Thread(target=client_gone) for _ in range(closers)]
        for thread in threads:
            thread.start()
        received: list[Any] = []
        error = None
        try:
            while batch := await session.next_batch():
                received += batch
        except SessionError as exc:
            error = exc
        for thread in threads:
            thread.join()
        return session, received, error

    return asyncio.run(main())


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(tool_messages, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_owner_verdict_is_the_schema_over_every_variable_however_the_stream_is_batched(
    messages: list[dict[str, Any]], cuts: list[int]
) -> None:
    session, received, error = run_session(ValidatorDesign.OWNER, split(messages, cuts))
    expected, applicable = reference(messages)
    if not applicable:
        assert error is not None and error.error_type == VARIABLE_ERROR
        assert "is not a string" in error.message
        assert received == messages[: len(received)]
        return
    assert received == messages
    assert session.variables is not None
    assert session.variables.validations == 1
    assert session.variables.validated_count == len(expected)
    verdict = SCHEMA.check(expected)
    if verdict is None:
        assert error is None
    else:
        assert error is not None and (error.error_type, error.message) == (VALIDATION_ERROR, verdict)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(tool_messages, max_size=30),
    design=st.sampled_from(list(DESIGNS)),  # every design that validates
    closers=st.integers(0, 2),
)
def test_every_design_ends_each_session_with_a_reported_outcome_under_racing_closers(
    messages: list[dict[str, Any]], design: ValidatorDesign, closers: int
) -> None:
    """Whoever closes first, the consumer gets its messages in order, then at most one error event;
    the lock validates at most once; nothing but a :class:`SessionError` ever escapes."""
    session, received, error = run_session(design, [[m] for m in messages], closers)
    assert received == messages[: len(received)]
    reported = {VALIDATION_ERROR, VALIDATION_CRASH, VARIABLE_ERROR, CLIENT_GONE}
    assert error is None or error.error_type in reported
    assert session.variables is not None
    if design is not ValidatorDesign.UNSAFE:
        assert session.variables.validations <= 1
    if closers == 0 and error is None:
        assert received == messages


@settings(max_examples=500, deadline=None)
@given(variables=st.dictionaries(NAMES | st.text(max_size=6), VALUES, max_size=8))
def test_the_verdict_is_none_exactly_when_the_schema_holds_and_else_names_a_rule(
    variables: dict[str, Any],
) -> None:
    verdict = SCHEMA.check(variables)
    assert (verdict is None) == Draft202012Validator(SCHEMA.schema).is_valid(variables)
    if verdict is not None:
        assert re.match(r"output variables? .*failed '\w+': ", verdict), verdict
