"""Output validation: one schema check per backend, and a session's whole variable path per design.

``check`` is one validation of a session's final map (what ``owner`` does once at
the end). The per-design benchmarks run what a session with 50 variables, 50
streamed chunks and ``done`` costs its design: every apply, the close hook and the
end hook, on one thread (no contention: that is measured end to end).
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.messages import EMIT_SCHEMA, emit_outputs
from daemon.config import ValidatorBackend, ValidatorDesign
from daemon.validation import OutputSchema, apply_variable, new_variables

BACKENDS = [b.value for b in ValidatorBackend]
MAPS: dict[str, dict[str, Any]] = {
    "valid 5 vars": {"done": True, "streamed": "c0;c1;", "var_0": 0, "var_1": 1, "var_2": 2},
    "valid 52 vars": {"done": True, "streamed": "c0;" * 50} | {f"var_{i}": i for i in range(50)},
    "invalid 52 vars": {"done": "not-a-bool", "streamed": "c0;" * 50} | {f"var_{i}": i for i in range(50)},
}
OUTPUTS = [m["message"] for m in emit_outputs(50)]


@pytest.mark.parametrize("label", list(MAPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_check(benchmark: Any, backend: str, label: str) -> None:
    benchmark.group = f"check {label}"
    schema = OutputSchema(EMIT_SCHEMA, ValidatorBackend(backend))
    verdict = benchmark(schema.check, MAPS[label])
    assert (verdict is None) == label.startswith("valid")


def session_variable_path(design: ValidatorDesign, schema: OutputSchema) -> str | None:
    variables = new_variables(design, schema)
    if variables is None:
        return None
    for message in OUTPUTS:
        variables.apply(message)
    if variables.validates_on_close:
        variables.on_close()
    return variables.on_end_reached()


@pytest.mark.parametrize("design", [d.value for d in ValidatorDesign])
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_variables_per_design(benchmark: Any, backend: str, design: str) -> None:
    benchmark.group = f"session of 101 variable messages, {backend}"
    schema = OutputSchema(EMIT_SCHEMA, ValidatorBackend(backend))
    assert benchmark(session_variable_path, ValidatorDesign(design), schema) is None


@pytest.mark.parametrize("design", ["bare dict", "unsafe", "lock", "owner"])
def test_apply_101_variable_messages(benchmark: Any, design: str) -> None:
    """The consumer's apply path alone: ``lock`` takes a lock per message, ``owner`` does not."""
    benchmark.group = "apply 101 variable messages"
    schema = OutputSchema(EMIT_SCHEMA)

    def run() -> int:
        if design == "bare dict":
            target: dict[str, Any] = {}
            for message in OUTPUTS:
                apply_variable(target, message)
            return len(target)
        variables = new_variables(ValidatorDesign(design), schema)
        assert variables is not None
        for message in OUTPUTS:
            variables.apply(message)
        return len(variables.variables)

    assert benchmark(run) == 52
