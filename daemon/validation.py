"""Output-variable validation: the compiled schema and the three designs we compare.

A tool that declares an ``output_schema`` gets its variable messages applied to a
per-session map (``stream: false`` replaces, ``stream: true`` appends a string
chunk) and the map validated once the plugin has finished. Who applies and who
validates is the design:

``unsafe``  the consumer applies; whoever closes the session validates, with no
            synchronisation (upstream's crash, kept as a reproduction).
``lock``    the same split, with the map guarded by a lock. No crash, but the closer
            may validate while variable messages are still queued, unapplied.
``owner``   only the consumer touches the map; the close travels in-band at the end
            of the stream, and the consumer validates when it reaches it.
``none``    no map and no validation: the benchmarks' baseline.

The schema itself is checked by one of two backends: ``jsonschema-rs``
(default: compiled, the same verdicts, linear-time patterns) or the pure-Python
``jsonschema``. The design decides *when* validation runs; the backend only how
long it takes.

No declaration may make a check unbounded, as a check may run on the event loop:
a declaration whose expansion (YAML aliases and ``$ref`` followed, each use counted)
exceeds :data:`MAX_SCHEMA_NODES` is refused at load (the ``anyOf``/``allOf`` alias
bombs that are exponential to walk); the Python backend evaluates ``pattern`` and
``patternProperties`` with jsonschema-rs's linear-time regex engine instead of
``re`` (``^(a+)+$`` is exponential there, and ``re`` holds the GIL throughout), and
gives up after :data:`CHECK_DEADLINE` seconds with :class:`ValidationTimeout`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import jsonschema
from jsonschema.exceptions import best_match
from jsonschema.validators import extend, validator_for
from opentelemetry.context import Context

from daemon import metrics, spans
from daemon.config import ValidatorBackend, ValidatorDesign

_tracer = spans.Tracer(__name__)  # not the API's proxy: see daemon/spans.py
# The output.validate span's attributes (LeanSpan.record); the error only when it failed.
_SPAN_KEYS = spans.key_set(
    ("validation.design", "validation.variables", "validation.verdict", "validation.error")
)


class SchemaDeclarationError(ValueError):
    """A tool declares an ``output_schema`` that is not a valid JSON Schema."""


class VariableMessageError(ValueError):
    """A variable message that cannot be applied (for example a non-string chunk)."""


class ValidationTimeout(RuntimeError):
    """A check that ran past :data:`CHECK_DEADLINE`; its session fails instead of the daemon stalling."""


MAX_SCHEMA_NODES = 20_000  # a real output_schema has tens to hundreds
MAX_SCHEMA_DEPTH = 64
CHECK_DEADLINE = 2.0  # seconds; the Python backend stops there (jsonschema-rs needs microseconds)


def expanded_size(schema: Any, limit: int = MAX_SCHEMA_NODES) -> int:
    """Nodes a validator may walk: shared nodes and local ``$ref`` targets counted at each use.

    Raises :class:`SchemaDeclarationError` above ``limit`` or :data:`MAX_SCHEMA_DEPTH`. A ``$ref``
    back into a schema being walked (recursion) is counted once: it is bounded by the instance.
    """
    count = 0

    def target(ref: str) -> Any:
        node: Any = schema
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def walk(node: Any, depth: int, refs: tuple[str, ...]) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise SchemaDeclarationError(
                f"invalid output_schema: it expands to more than {limit} subschemas "
                "(aliases or $ref used many times over)"
            )
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaDeclarationError(f"invalid output_schema: nested deeper than {MAX_SCHEMA_DEPTH}")
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#") and ref not in refs:
                found = target(ref)
                if found is not None:
                    walk(found, depth + 1, (*refs, ref))
            for value in node.values():
                walk(value, depth + 1, refs)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1, refs)

    walk(schema, 0, ())
    return count


@functools.lru_cache(maxsize=1024)
def _linear_pattern(pattern: str) -> Callable[[str], bool]:
    """``re.search(pattern, s) is not None``, on jsonschema-rs's regex engine (linear time)."""
    import jsonschema_rs

    return jsonschema_rs.validator_for({"pattern": pattern}).is_valid


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not _linear_pattern(pattern)(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        matches = _linear_pattern(pattern)
        for key, value in instance.items():
            if matches(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_deadline = threading.local()


def _bounded(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """A keyword that first checks the current check's deadline (a few ns per keyword)."""

    def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > getattr(_deadline, "at", float("inf")):
            raise ValidationTimeout(f"output validation did not finish within {CHECK_DEADLINE:g} s")
        return keyword(validator, value, instance, schema)

    return run


def _python_validator_class(cls: Any) -> Any:
    keywords = {**cls.VALIDATORS, "pattern": _pattern, "patternProperties": _pattern_properties}
    return extend(cls, {name: _bounded(fn) for name, fn in keywords.items()})


class BackendUnavailable(RuntimeError):
    """The selected validator backend is not installed."""


def check_backend(backend: ValidatorBackend) -> None:
    """Fail at start-up, not at the first invocation, if the backend cannot be imported."""
    if backend is ValidatorBackend.JSONSCHEMA_RS:
        try:
            import jsonschema_rs  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                "validator backend jsonschema-rs is not installed (pip install jsonschema-rs)"
            ) from None


class _Checker(Protocol):
    def __call__(self, variables: Mapping[str, Any]) -> str | None: ...


class OutputSchema:
    """A tool's ``output_schema``, checked and compiled once at load time.

    ``jsonschema.validate`` re-checks the schema on every call (milliseconds);
    a compiled validator does not. The declaration is always checked against the
    meta-schema by ``jsonschema``, so both backends refuse the same declarations
    with the same message.
    """

    def __init__(
        self, schema: Mapping[str, Any], backend: ValidatorBackend = ValidatorBackend.JSONSCHEMA
    ) -> None:
        expanded_size(schema)
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise SchemaDeclarationError(f"invalid output_schema: {exc.message}") from exc
        self.schema = schema
        self.backend = ValidatorBackend(backend)
        self._check: _Checker = _rs_checker(schema)  # compiled for both: the same refusals
        if self.backend is not ValidatorBackend.JSONSCHEMA_RS:
            self._check = _python_checker(_python_validator_class(cls)(schema))

    def check(self, variables: Mapping[str, Any]) -> str | None:
        """None if ``variables`` conform, else a message naming the variable and rule."""
        return self._check(variables)


def _python_checker(validator: Any) -> _Checker:
    def check(variables: Mapping[str, Any]) -> str | None:
        _deadline.at = time.monotonic() + CHECK_DEADLINE
        try:
            error = best_match(validator.iter_errors(variables))
        finally:
            del _deadline.at
        if error is None:
            return None
        return describe(error, variables)

    return check


def _rs_checker(schema: Mapping[str, Any]) -> _Checker:
    import jsonschema_rs

    try:
        validator = jsonschema_rs.validator_for(dict(schema))
    except (ValueError, jsonschema_rs.ValidationError) as exc:
        raise SchemaDeclarationError(f"invalid output_schema (jsonschema-rs): {exc}") from exc

    def check(variables: Mapping[str, Any]) -> str | None:
        if validator.is_valid(variables):  # the common case: no error objects built
            return None
        error = next(iter(validator.iter_errors(variables)))
        path = list(error.instance_path)
        rule = str(error.schema_path[-1]) if error.schema_path else error.kind.name
        name = None
        if path:
            name = str(path[0])
        elif rule == "required":
            name = str(getattr(error.kind, "property", "?"))
        return _message(name, rule, error.message)

    return check


def describe(error: jsonschema.ValidationError, variables: Mapping[str, Any]) -> str:
    path = list(error.absolute_path)
    if path:
        name = str(path[0])
    elif error.validator == "required" and isinstance(error.validator_value, list):
        missing = [key for key in error.validator_value if key not in variables]
        name = str(missing[0]) if missing else "?"
    else:
        name = None
    return _message(name, str(error.validator), error.message)


def _message(name: str | None, rule: str, detail: str) -> str:
    where = f"output variable {name!r}" if name is not None else "output variables"
    return f"{where} failed {rule!r}: {detail}"


class Chunks(list[str]):
    """A streamed variable's chunks so far: appended one by one, joined once, when validated.

    Joining per chunk (``current + value``) copies the whole string each time: quadratic,
    minutes of loop time for a few hundred thousand chunks.
    """


def apply_variable(variables: dict[str, Any], message: Mapping[str, Any]) -> None:
    """Apply one ``variable`` tool message to ``variables`` (read them with :func:`joined`)."""
    name = message.get("variable_name")
    value = message.get("variable_value")
    if not isinstance(name, str):
        raise VariableMessageError("variable message without a string variable_name")
    if message.get("stream"):
        if not isinstance(value, str):
            raise VariableMessageError(f"streamed chunk of variable {name!r} is not a string")
        current = variables.get(name)
        if isinstance(current, Chunks):
            current.append(value)
        else:  # a streamed value starts from the stored string, or from "" over anything else
            variables[name] = Chunks([current, value] if isinstance(current, str) else [value])
    else:
        variables[name] = value


def _value(value: Any) -> Any:
    return "".join(value) if isinstance(value, Chunks) else value


def joined(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables as the plugin meant them: every streamed one a string."""
    return {name: _value(value) for name, value in variables.items()}


class OutputVariables:
    """One session's variables under one design. Subclasses pick the design.

    ``apply`` is called by the consumer for each variable message, ``on_close`` by
    whoever closes the session (the reader, HTTP layer, timeout), and
    ``on_end_reached`` by the consumer when it reaches the clean end of the stream.
    The last two return/record the verdict: None for "valid", else a message.
    """

    design: ClassVar[ValidatorDesign]
    validates_on_close: ClassVar[bool]

    def __init__(self, schema: OutputSchema) -> None:
        self.schema = schema
        self.variables: dict[str, Any] = {}
        self.validations = 0
        self.verdict: str | None = None
        self.validated_count: int | None = None  # how many variables the verdict saw
        self.trace_context: Context | None = None  # the session span, the parent of ours

    def apply(self, message: Mapping[str, Any]) -> None:
        apply_variable(self.variables, message)

    def on_close(self) -> None:
        """The closer's hook; validates here only in designs that split the work."""

    def on_end_reached(self) -> str | None:
        return self.verdict

    def _validate(self) -> None:
        # Runs on the consumer's task (owner) or on whichever thread closes (lock,
        # unsafe), so the span's parent is passed explicitly; with tracing off there
        # is no parent and no span.
        if self.trace_context is None:
            self._check()
            return
        with _tracer.start_span("output.validate", context=self.trace_context) as span:
            count = self._check()
            verdict = self.verdict  # the enum's value read as stored: ``.value`` is a Python-level property
            outcome = (self.design._value_, count, "pass" if verdict is None else "fail", verdict)
            spans.record(span, _SPAN_KEYS, outcome)

    def _check(self) -> int:
        """Validate the variables as they are now; returns how many there were."""
        series = metrics.validation_series(self.design._value_)  # (as _validate reads it)
        started = time.perf_counter()
        try:
            # Build the instance by iterating the live map, as upstream did: this
            # loop is where a concurrent writer raises "dictionary changed size".
            snapshot = {name: _value(value) for name, value in self.variables.items()}
            self.validations += 1
            self.validated_count = len(snapshot)
            self.verdict = self.schema.check(snapshot)
        except Exception:
            series.record(time.perf_counter() - started, "crash")
            raise
        series.record(time.perf_counter() - started, "pass" if self.verdict is None else "fail")
        return len(snapshot)


class _CloserValidates(OutputVariables):
    """The split design: the consumer applies, the first closer validates.

    ``unsafe`` and ``lock`` differ only in the guard around the map and the flag.
    """

    validates_on_close = True

    def __init__(self, schema: OutputSchema, guard: AbstractContextManager[Any]) -> None:
        super().__init__(schema)
        self._guard = guard
        self._closed = False

    def apply(self, message: Mapping[str, Any]) -> None:
        with self._guard:
            apply_variable(self.variables, message)

    def on_close(self) -> None:
        with self._guard:
            if self._closed:  # without a lock, two closers may both get past this check
                return
            self._closed = True
            self._validate()


class UnsafeVariables(_CloserValidates):
    design = ValidatorDesign.UNSAFE

    def __init__(self, schema: OutputSchema) -> None:
        super().__init__(schema, contextlib.nullcontext())


class LockedVariables(_CloserValidates):
    design = ValidatorDesign.LOCK

    def __init__(self, schema: OutputSchema) -> None:
        super().__init__(schema, threading.Lock())


class OwnedVariables(OutputVariables):
    design = ValidatorDesign.OWNER
    validates_on_close = False

    def on_end_reached(self) -> str | None:
        if self.validations == 0:
            self._validate()
        return self.verdict


DESIGNS: dict[ValidatorDesign, type[OutputVariables]] = {
    cls.design: cls for cls in (UnsafeVariables, LockedVariables, OwnedVariables)
}


def new_variables(design: ValidatorDesign, schema: OutputSchema | None) -> OutputVariables | None:
    """A session's variables under ``design``; None when nothing is to be validated."""
    if schema is None or design is ValidatorDesign.NONE:
        return None
    return DESIGNS[design](schema)
