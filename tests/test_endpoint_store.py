"""The ``endpoints`` table (``daemon/endpoints/store.py``) on every database the daemon runs on,
and the settings rules (``daemon/endpoints/settings.py``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from daemon.endpoints import settings
from daemon.endpoints.store import HOOK_ALPHABET, Endpoints
from daemon.state import Database

CONFIGS = [
    {"name": "greeting", "type": "text-input", "required": True},
    {"name": "api_key", "type": "secret-input"},
    {"name": "mode", "type": "select", "options": [{"value": "fast"}, {"value": "slow"}]},
    {"name": "on", "type": "boolean"},
    {"name": "model", "type": "model-selector", "scope": "rerank"},
]


def test_endpoints_are_kept_per_tenant(database: Database) -> None:
    async def scenario() -> None:
        store = Endpoints(database)
        first = await store.create("t1", "u1", "a/p", "first", {"greeting": "hi", "nested": {"k": [1, 2]}})
        second = await store.create("t1", "u1", "a/q", "second", {})
        other = await store.create("t2", "u2", "a/p", "other", {})
        assert uuid.UUID(first.id).version == 7 and first.id < second.id  # time-ordered
        assert len(first.hook_id) == 16 and set(first.hook_id) <= set(HOOK_ALPHABET)
        assert len({first.hook_id, second.hook_id, other.hook_id}) == 3

        # Newest first, paged, per tenant, per plugin.
        assert [e.id for e in await store.page("t1", 1, 10)] == [second.id, first.id]
        assert [e.id for e in await store.page("t1", 2, 1)] == [first.id]
        assert [e.id for e in await store.page("t1", 1, 10, "a/p")] == [first.id]
        assert [e.id for e in await store.page("t2", 1, 10)] == [other.id]

        found = await store.get("t1", first.id)
        assert found is not None and found.settings == {"greeting": "hi", "nested": {"k": [1, 2]}}
        assert found.created_at == first.created_at and found.created_at.tzinfo is not None
        assert await store.get("t2", first.id) is None
        assert (await store.by_hook(first.hook_id)) == found

        # Another tenant's id changes nothing.
        assert await store.change("t2", first.id, enabled=False) is None
        assert not await store.remove("t2", first.id)
        changed = await store.change(
            "t1", first.id, enabled=False, name="renamed", settings={"greeting": "yo"}
        )
        assert changed is not None and not changed.enabled and changed.name == "renamed"
        assert changed.settings == {"greeting": "yo"} and changed.updated_at >= first.updated_at
        assert await store.remove("t1", first.id)
        assert await store.by_hook(first.hook_id) is None and not await store.remove("t1", first.id)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({}, "missing required setting: greeting"),
        ({"greeting": None}, "missing required setting: greeting"),
        ({"greeting": 1}, "setting greeting is not a string"),
        ({"greeting": "x", "api_key": 5}, "setting api_key is not a string"),
        ({"greeting": "x", "mode": "medium"}, "setting mode is not a valid option"),
        ({"greeting": "x", "on": "yes"}, "setting on is not a boolean"),
        ({"greeting": "x", "model": "gpt"}, "setting model is not a map"),
        (
            {"greeting": "x", "model": {"provider": "p", "model": "m", "model_type": "rerank"}},
            "missing score_threshold",
        ),
        ({"greeting": "x", **{f"k{n}": n for n in range(64)}}, "too many setting fields"),
    ],
)
def test_settings_that_break_their_declaration_are_named(given: dict[str, object], problem: str) -> None:
    with pytest.raises(settings.InvalidSettings, match=problem):
        settings.check(given, CONFIGS)


def test_settings_within_their_declaration_pass() -> None:
    model = {"provider": "p", "model": "m", "model_type": "rerank", "score_threshold": 0.5, "top_n": 3}
    settings.check({"greeting": "x", "mode": "fast", "on": True, "model": model, "extra": 1}, CONFIGS)


def test_secrets_are_masked_and_a_masked_secret_sent_back_keeps_its_value() -> None:
    kept = {"greeting": "hello there", "api_key": "sk-0123456789"}
    shown = settings.mask(kept, CONFIGS)
    assert shown == {"greeting": "hello there", "api_key": "sk*********89"}
    assert settings.mask({"api_key": "short"}, CONFIGS) == {"api_key": "*****"}
    assert settings.unmask(shown, kept, CONFIGS) == kept
    assert settings.unmask({**shown, "api_key": "new"}, kept, CONFIGS)["api_key"] == "new"
    # Only secrets are restored: a text setting equal to its shown value is just that value.
    assert settings.unmask({"greeting": "hello there"}, kept, CONFIGS) == {"greeting": "hello there"}
