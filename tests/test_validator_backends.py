"""Validator backends (jsonschema, jsonschema-rs) and the ``none`` design.

Both backends must give the same verdicts and name the variable and the rule, so
that the faster one can replace the other without the caller noticing more than
the quoting in the detail text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import ValidatorBackend, ValidatorDesign
from daemon.session import VALIDATION_ERROR
from daemon.testing import PLUGINS, Daemon
from daemon.validation import (
    OutputSchema,
    SchemaDeclarationError,
    check_backend,
    new_variables,
)
from tests import strategies
from tests.test_runtime import FP, last_error
from tests.test_validation import run_lagging_consumer

DECLARATION = {
    "type": "object",
    "properties": {"done": {"type": "boolean"}, "streamed": {"type": "string"}},
    "patternProperties": {"^var_[0-9]+$": {"type": "integer"}},
    "required": ["done"],
}
BACKENDS = list(ValidatorBackend)


@pytest.fixture(params=BACKENDS, ids=[b.value for b in BACKENDS])
def schema(request: pytest.FixtureRequest) -> OutputSchema:
    return OutputSchema(DECLARATION, request.param)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"done": True, "var_1": 1, "streamed": "c0;"}, None),
        ({"done": "yes"}, ("output variable 'done' failed 'type': ", "yes", "boolean")),
        ({"var_3": 3}, ("output variable 'done' failed 'required': ", "done", "required property")),
        ({"done": True, "var_2": "x"}, ("output variable 'var_2' failed 'type': ", "x", "integer")),
    ],
)
def test_both_backends_give_the_same_verdict_naming_variable_and_rule(
    schema: OutputSchema, variables: dict[str, Any], expected: tuple[str, ...] | None
) -> None:
    verdict = schema.check(variables)
    if expected is None:
        assert verdict is None
        return
    assert verdict is not None
    prefix, *details = expected
    assert verdict.startswith(prefix), verdict
    for detail in details:
        assert detail in verdict


def test_the_python_backend_message_is_unchanged() -> None:
    schema = OutputSchema(DECLARATION, ValidatorBackend.JSONSCHEMA)
    assert schema.check({"done": "yes"}) == (
        "output variable 'done' failed 'type': 'yes' is not of type 'boolean'"
    )


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.value for b in BACKENDS])
def test_both_backends_refuse_an_invalid_declaration_at_load(backend: ValidatorBackend) -> None:
    with pytest.raises(SchemaDeclarationError, match="invalid output_schema"):
        OutputSchema({"type": "object", "properties": {"x": {"type": "no-such-type"}}}, backend)


def test_the_rs_backend_is_installed_here() -> None:
    check_backend(ValidatorBackend.JSONSCHEMA_RS)  # the test extra installs it


def test_none_design_keeps_no_variables() -> None:
    schema = OutputSchema(DECLARATION)
    assert new_variables(ValidatorDesign.NONE, schema) is None
    assert new_variables(ValidatorDesign.OWNER, None) is None
    owned = new_variables(ValidatorDesign.OWNER, schema)
    assert owned is not None and owned.design is ValidatorDesign.OWNER


@pytest.mark.parametrize(
    ("design", "right"),
    [(ValidatorDesign.OWNER, True), (ValidatorDesign.LOCK, False), (ValidatorDesign.UNSAFE, False)],
)
def test_designs_behave_the_same_on_the_rs_backend(design: ValidatorDesign, right: bool) -> None:
    """The lagging-consumer race of tests/test_validation.py, with jsonschema-rs behind it."""
    schema = OutputSchema(DECLARATION, ValidatorBackend.JSONSCHEMA_RS)
    _, count, error = run_lagging_consumer(design, 20, schema)
    assert count == 41
    if right:
        assert error is None
    else:
        assert error is not None and error.error_type == VALIDATION_ERROR
        assert "'done' failed 'required'" in error.message


def test_daemon_with_the_rs_backend_reports_the_violation(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), validator_backend="jsonschema-rs")
    daemon.wait_ready(FP)
    assert all(e.ok for e in daemon.invoke(FP, "emit", {"count": 1, "variables": 3, "stream_chunks": 2}))
    events = daemon.invoke(FP, "emit", {"count": 1, "violate": True})
    assert [e.ok for e in events] == [True, True, False]
    error = last_error(events)
    assert error["error_type"] == "ToolOutputValidationError"
    assert error["message"] == (
        "output variable 'done' failed 'type': \"not-a-bool\" is not of type \"boolean\""
    )


def test_daemon_with_validator_none_relays_without_a_verdict(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), validator="none")
    daemon.wait_ready(FP)
    events = daemon.invoke(FP, "emit", {"count": 2, "violate": True})
    assert len(events) == 3 and all(e.ok for e in events)


def bundled_schemas() -> list[tuple[str, dict[str, Any]]]:
    """Every ``output_schema`` the bundled plugins declare (the broken one excepted)."""
    found = []
    for path in sorted(PLUGINS.glob("*/tools/*.yaml")):
        declared = yaml.safe_load(path.read_text()).get("output_schema")
        if declared is not None and path.stem != "broken_schema":
            found.append((f"{path.parent.parent.name}/{path.stem}", declared))
    return [*found, ("declaration", DECLARATION)]


@functools.cache
def compiled(tool: str, backend: ValidatorBackend) -> OutputSchema:
    return OutputSchema(dict(bundled_schemas())[tool], backend)


def variables_for(declared: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    names = [*sorted(declared.get("properties", {})), "var_1", "var_x", "other"]
    return st.dictionaries(st.sampled_from(names), strategies.json_values(), max_size=len(names))


@pytest.mark.parametrize(("tool", "declared"), bundled_schemas(), ids=[t for t, _ in bundled_schemas()])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_both_backends_agree_on_every_bundled_schema(
    tool: str, declared: dict[str, Any], data: st.DataObject
) -> None:
    """Why jsonschema-rs can be the default: on every schema we ship, the same pass or fail."""
    variables = data.draw(variables_for(declared))
    python = compiled(tool, ValidatorBackend.JSONSCHEMA).check(variables)
    rust = compiled(tool, ValidatorBackend.JSONSCHEMA_RS).check(variables)
    assert (python is None) == (rust is None), (python, rust)
