"""The bundled example plugins, written on the official dify_plugin SDK, behind the daemon."""

from __future__ import annotations

import httpx

from daemon.testing import Daemon, parse_sse

TK = "demo/text_toolkit"
NOTES = "demo/notes"


def test_word_stats_streams_text_json_and_variables(sdk_daemon: Daemon) -> None:
    events = sdk_daemon.invoke(TK, "word_stats", {"text": "The cat and the hat."})
    assert all(e.ok for e in events)
    assert [e.message for e in events] == [
        {"type": "text", "message": {"text": "5 words, 4 unique"}, "meta": None},
        {
            "type": "json",
            "message": {
                "json_object": {"words": 5, "unique": 4, "top": [["the", 2], ["cat", 1], ["and", 1]]}
            },
            "meta": None,
        },
        {
            "type": "variable",
            "message": {"variable_name": "words", "variable_value": 5, "stream": False},
            "meta": None,
        },
        {
            "type": "variable",
            "message": {"variable_name": "unique", "variable_value": 4, "stream": False},
            "meta": None,
        },
        {
            "type": "variable",
            "message": {"variable_name": "top_word", "variable_value": "the", "stream": False},
            "meta": None,
        },
    ]


def test_streamed_variables_are_relayed_and_validated(sdk_daemon: Daemon) -> None:
    events = sdk_daemon.invoke(TK, "story", {"topic": "rain", "sentences": 2})
    assert all(e.ok for e in events)
    chunks = [e.message["message"] for e in events if e.message["message"].get("stream")]
    assert len(chunks) > 2
    story = "".join(c["variable_value"] for c in chunks)
    assert "rain" in story
    assert events[-1].message["message"] == {
        "variable_name": "sentences",
        "variable_value": 2,
        "stream": False,
    }


def test_a_tool_that_raises_mid_stream_ends_with_its_error(sdk_daemon: Daemon) -> None:
    events = sdk_daemon.invoke(TK, "flaky", {"fail_after": 2})
    assert [e.message["message"]["text"] for e in events[:-1]] == ["step 1", "step 2"]
    error = events[-1].error
    assert events[-1].raw["code"] == -500
    assert error["message"] == "flaky tool gave up after 2 steps"
    assert error["error_type"] == "RuntimeError"


def test_an_output_that_violates_its_schema_gets_the_verdict(sdk_daemon: Daemon) -> None:
    events = sdk_daemon.invoke(TK, "broken_schema", {})
    assert [e.ok for e in events] == [True, True, False]
    error = events[-1].error
    assert error["error_type"] == "ToolOutputValidationError"
    assert (
        error["message"] == "output variable 'score' failed 'maximum': 250 is greater than the maximum of 100"
    )


def test_notes_use_storage_isolated_per_tenant(sdk_daemon: Daemon) -> None:
    def variables(tenant: str, tool: str, **params: str) -> dict[str, object]:
        events = sdk_daemon.invoke(NOTES, tool, params, tenant=tenant)
        assert all(e.ok for e in events), events[-1].raw
        return {
            m["variable_name"]: m["variable_value"]
            for m in (e.message["message"] for e in events if e.message["type"] == "variable")
        }

    assert variables("tenant-a", "save_note", title="plan", body="buy milk") == {"saved": True}
    assert variables("tenant-a", "read_note", title="plan") == {"found": True, "body": "buy milk"}
    assert variables("tenant-b", "read_note", title="plan") == {"found": False, "body": ""}
    assert variables("tenant-a", "delete_note", title="plan") == {"deleted": True}
    assert variables("tenant-a", "read_note", title="plan") == {"found": False, "body": ""}


def test_validate_credentials_on_an_sdk_plugin(sdk_daemon: Daemon) -> None:
    r = httpx.post(
        f"{sdk_daemon.url}/plugin/t1/dispatch/tool/validate_credentials",
        headers=sdk_daemon.headers(TK),
        json={"user_id": "u", "data": {"provider": "text_toolkit", "credentials": {}}},
        timeout=60,
    )
    assert r.status_code == 200
    assert [e.message for e in parse_sse(r.content)] == [{"result": True}]
