"""Output validation: the compiled schema, applying variables, and the three designs.

The race tests drive a real :class:`Session` from a real producer thread, the way
the instance's reader thread does, with a consumer that lags behind on purpose.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest

from daemon.config import ValidatorDesign
from daemon.errors import VALIDATION_ERROR, SessionError
from daemon.session import Session
from daemon.validation import (
    DESIGNS,
    OutputSchema,
    SchemaDeclarationError,
    VariableMessageError,
    apply_variable,
)

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
    assert variables == {"var_0": 0, "var_1": 1, "var_2": 2, "streamed": "c0;c1;c2;", "done": True}
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
        async for batch in session.batches():
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
                async for batch in session.batches():
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
