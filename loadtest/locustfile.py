"""Locust users that invoke tools over SSE the way Dify's API server does, faults included.

``python -m loadtest`` starts a daemon and runs this file headless against it. By hand:

    LOADTEST_SERVER_KEY=$(cat .daemon-state/server.key) \\
        locust -f loadtest/locustfile.py --host http://127.0.0.1:5002

(run from the repository root with ``PYTHONPATH=.``; the daemon needs the ``demo/crashproto``
copy of fastproto that ``python -m loadtest`` makes, or the ``Crasher`` users fail).

Every invocation is read incrementally (an SSE event may span chunks) and reported as
locust entries, all named after the scenario:

* ``POST``: the invocation itself, time to the response headers; it carries the
  outcome, so its failures are the run's failures (:mod:`loadtest.expect`);
* ``TTFE`` / ``TTLE``: time to the first / last event (ms);
* ``STREAM``: from the first event to the last (ms);
* ``EVENTS``: events in the stream (the "response time" columns hold the count).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import gevent
import requests
from locust import HttpUser, between, constant, task

from daemon.testing import Event, SSEReader
from loadtest.expect import (
    VALIDATION_ERROR,
    BrokenStream,
    Expect,
    LoadFailure,
    fastproto_emit,
    tool_message,
    variable,
)

FASTPROTO = "demo/fastproto"
CRASHPROTO = "demo/crashproto"  # a second copy of fastproto, crashed on purpose
TEXT_TOOLKIT = "demo/text_toolkit"
NOTES = "demo/notes"

_tenants = itertools.count()


class InvokingUser(HttpUser):
    """Invokes tools over SSE and reports each stream as the entries above."""

    abstract = True

    def on_start(self) -> None:
        self.key = os.environ["LOADTEST_SERVER_KEY"]
        self.tenant = f"tenant-{next(_tenants)}"

    def invoke(
        self,
        scenario: str,
        plugin_id: str,
        tool: str,
        params: Mapping[str, Any],
        expect: Expect,
        *,
        provider: str | None = None,
        chunk_size: int | None = None,
        pause: float = 0.0,
        leave_after_first: bool = False,
    ) -> list[Event]:
        """One invocation; ``pause`` sleeps between reads (a slow reader), ``leave_after_first``
        hangs up at the first event (a client that disconnects mid-stream)."""
        body = {
            "user_id": f"user-{self.tenant}",
            "data": {
                "provider": provider or plugin_id.split("/")[1],
                "tool": tool,
                "tool_parameters": dict(params),
            },
        }
        headers = {"X-Api-Key": self.key, "X-Plugin-ID": plugin_id, "Content-Type": "application/json"}
        url = f"/plugin/{self.tenant}/dispatch/tool/invoke"
        reader, events, received = SSEReader(), [], 0
        started = time.perf_counter()
        first = last = None
        with self.client.post(
            url, data=json.dumps(body), headers=headers, name=scenario, stream=True, catch_response=True
        ) as response:
            try:
                if response.status_code != 200:
                    raise BrokenStream(f"HTTP {response.status_code}: {response.text[:200]}")
                for chunk in response.iter_content(chunk_size=chunk_size):
                    received += len(chunk)
                    new = reader.feed(chunk)
                    if new:
                        last = time.perf_counter()
                        first = first or last
                        events += new
                    if leave_after_first and events:
                        response.close()
                        break
                    if pause:
                        gevent.sleep(pause)
                else:
                    if reader.pending:
                        raise BrokenStream(f"the body ended inside an event ({len(reader.pending)} bytes)")
                if leave_after_first:
                    if not events[0].ok:
                        raise BrokenStream(f"first event is an error: {events[0].raw}")
                else:
                    expect.check(events)
            except LoadFailure as failure:
                response.failure(failure)
            except (requests.RequestException, ValueError, AssertionError) as exc:
                response.failure(BrokenStream(f"{type(exc).__name__}: {exc}"))
            else:
                response.success()
            response.request_meta["response_length"] = received
        if first is not None and last is not None:
            self._record("TTFE", scenario, (first - started) * 1000)
            self._record("TTLE", scenario, (last - started) * 1000)
            self._record("STREAM", scenario, (last - first) * 1000)
            self._record("EVENTS", scenario, len(events))
        return events

    def _record(self, kind: str, scenario: str, value: float) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=scenario,
            response_time=value,
            response_length=0,
            exception=None,
            context={},
        )


class FastprotoUser(InvokingUser):
    """The bulk: small valid streams with variables from the fast plugin, back to back."""

    weight = 1
    wait_time = constant(0)

    @task
    def emit(self) -> None:
        params, expect = fastproto_emit(count=3, variables=5, stream_chunks=5)
        self.invoke("fastproto emit", FASTPROTO, "emit", params, expect)


class SdkUser(InvokingUser):
    """The official SDK's plugins: text, json, streamed variables, and storage round trips."""

    fixed_count = 2
    wait_time = between(0.05, 0.2)

    @task(2)
    def word_stats(self) -> None:
        expect = Expect(
            (
                tool_message("text", {"text": "5 words, 4 unique"}),
                tool_message(
                    "json",
                    {"json_object": {"words": 5, "unique": 4, "top": [["the", 2], ["cat", 1], ["and", 1]]}},
                ),
                variable("words", 5),
                variable("unique", 4),
                variable("top_word", "the"),
            )
        )
        params = {"text": "The cat and the hat."}
        self.invoke("sdk word_stats", TEXT_TOOLKIT, "word_stats", params, expect)

    @task(1)
    def story(self) -> None:
        story = "Once upon a time there was a rain. Every morning the rain went looking for something new."
        expect = Expect(variables={"story": story, "sentences": 2})
        self.invoke("sdk story", TEXT_TOOLKIT, "story", {"topic": "rain", "sentences": 2}, expect)

    @task(1)
    def note(self) -> None:
        """Save a note, then read it back: storage must lose nothing under load."""
        title, text = f"n{time.monotonic_ns()}", f"body of {self.tenant} ✓"
        saved = Expect((tool_message("text", {"text": f"saved {title}"}), variable("saved", True)))
        self.invoke("sdk notes save", NOTES, "save_note", {"title": title, "body": text}, saved)
        read = Expect((tool_message("text", {"text": text}), variable("found", True), variable("body", text)))
        self.invoke("sdk notes read", NOTES, "read_note", {"title": title}, read)


class SlowReader(InvokingUser):
    """Reads 4 KiB at a time with pauses: the plugin finishes long before the caller does,
    and the verdict must still come last and be right."""

    fixed_count = 2
    wait_time = between(0.05, 0.2)

    @task
    def slow(self) -> None:
        params, expect = fastproto_emit(count=100, size=1024, variables=20, stream_chunks=20)
        self.invoke("slow reader", FASTPROTO, "emit", params, expect, chunk_size=4096, pause=0.002)

    @task
    def slow_violation(self) -> None:
        params, expect = fastproto_emit(count=100, size=1024, variables=20, violate=True)
        self.invoke("slow reader violation", FASTPROTO, "emit", params, expect, chunk_size=4096, pause=0.002)


class Disconnecter(InvokingUser):
    """Hangs up at the first event of a one-second stream; the daemon must end that session.

    The protocol has no cancel, so the plugin goes on to the end of the stream; a longer
    one would load the plugin with orphaned work rather than the daemon.
    """

    fixed_count = 2
    wait_time = between(0.05, 0.2)

    @task
    def leave(self) -> None:
        params = {"count": 100, "delay_ms": 10, "variables": 3}
        self.invoke("disconnect", FASTPROTO, "emit", params, Expect(), leave_after_first=True)


class SchemaViolator(InvokingUser):
    """Outputs that break their schema: the verdict must be the final event."""

    fixed_count = 1
    wait_time = between(0.05, 0.2)

    @task
    def fastproto(self) -> None:
        params, expect = fastproto_emit(count=2, variables=10, stream_chunks=5, violate=True)
        self.invoke("fastproto violation", FASTPROTO, "emit", params, expect)

    @task
    def sdk(self) -> None:
        expect = Expect(
            (tool_message("text", {"text": "scoring done"}), variable("score", 250)),
            error_type=VALIDATION_ERROR,
            message="output variable 'score' failed 'maximum': 250 is greater than the maximum of 100",
        )
        self.invoke("sdk broken_schema", TEXT_TOOLKIT, "broken_schema", {}, expect)


class Raiser(InvokingUser):
    """Tools that raise mid-stream: the messages so far, then the plugin's own error."""

    fixed_count = 1
    wait_time = between(0.05, 0.2)

    @task
    def fastproto(self) -> None:
        params, expect = fastproto_emit(count=5, variables=5, error_at=4)
        self.invoke("fastproto raises", FASTPROTO, "emit", params, expect)

    @task
    def sdk(self) -> None:
        expect = Expect(
            (tool_message("text", {"text": "step 1"}), tool_message("text", {"text": "step 2"})),
            error_type="RuntimeError",
            message="flaky tool gave up after 2 steps",
        )
        self.invoke("sdk flaky", TEXT_TOOLKIT, "flaky", {"fail_after": 2}, expect)


class Crasher(InvokingUser):
    """Crashes its own plugin mid-stream: a clear error, a restart, no one else touched."""

    fixed_count = 1
    wait_time = between(0.5, 1.0)

    @task
    def crash(self) -> None:
        params, _ = fastproto_emit(count=5)
        expect = Expect(
            (tool_message("text", {"text": "abcdefghijklmnop"}),) * 2,
            error_type="PluginInstanceDiedError",
            message_part="exited (exit code 3)",
        )
        self.invoke(
            "crashproto crash", CRASHPROTO, "emit", params | {"crash_at": 2}, expect, provider="fastproto"
        )
