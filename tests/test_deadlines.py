"""A reused deadline fires once, never early, at the time it was last set for; cleared, never.

Run on both event loops the daemon may serve on. Times are checked only as lower bounds
(never early) and with generous waits (it did fire): nothing here depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from daemon.deadlines import Deadline

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return LOOPS[request.param]


class Fired:
    """Records when each named callback ran, by the loop's clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: dict[str, list[float]] = {}
        self.event = asyncio.Event()

    def __call__(self, name: str) -> Callable[[], None]:
        def callback() -> None:
            self.at.setdefault(name, []).append(self.loop.time())
            self.event.set()

        return callback

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), 30)  # generous: only says it fired


def test_it_fires_once_and_not_before_its_time(run: Callable[..., None]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        set_at = loop.time()
        deadline.set(0.05, fired("a"))
        await fired.wait()
        await asyncio.sleep(0.1)
        assert len(fired.at["a"]) == 1
        assert fired.at["a"][0] >= set_at + 0.05

    run(main())


def test_set_again_it_fires_at_the_new_time_only(run: Callable[..., None]) -> None:
    """The loop timer armed for the first time finds a later deadline and waits for that one."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        deadline.set(0.1, fired("first"))
        await asyncio.sleep(0.05)
        reset_at = loop.time()
        deadline.set(0.2, fired("second"))
        await fired.wait()
        await asyncio.sleep(0.15)
        assert "first" not in fired.at
        assert len(fired.at["second"]) == 1 and fired.at["second"][0] >= reset_at + 0.2

    run(main())


def test_set_earlier_than_before_it_fires_at_the_earlier_time(run: Callable[..., None]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        deadline.set(3600, fired("late"))
        deadline.set(0.05, fired("soon"))
        await fired.wait()
        assert list(fired.at) == ["soon"]
        deadline.close()

    run(main())


def test_cleared_it_does_not_fire_and_can_be_set_again(run: Callable[..., None]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        deadline.set(0.05, fired("cleared"))
        deadline.clear()
        await asyncio.sleep(0.2)
        assert fired.at == {}
        deadline.set(0.05, fired("again"))
        await fired.wait()
        assert list(fired.at) == ["again"]

    run(main())


def test_one_set_per_request_back_to_back_fires_nothing_until_one_is_left_to_expire(
    run: Callable[..., None],
) -> None:
    """How a connection uses it: set at each request, cleared at its end; only the last one,
    left set, fires."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        for n in range(50):
            deadline.set(0.05, fired(f"request {n}"))
            await asyncio.sleep(0.005)
            deadline.clear()
        left_at = loop.time()
        deadline.set(0.05, fired("left"))
        await fired.wait()
        await asyncio.sleep(0.1)
        assert list(fired.at) == ["left"] and fired.at["left"][0] >= left_at + 0.05

    run(main())


def test_closed_while_set_it_still_fires_for_whoever_set_it_and_then_arms_nothing(
    run: Callable[..., None],
) -> None:
    """A connection lost while its request runs: the request's deadline is kept until it fires
    (or the request clears it); no loop timer is left behind after that."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired = Fired(loop)
        deadline = Deadline(loop)
        deadline.set(0.05, fired("running request"))
        deadline.close()
        await fired.wait()
        assert list(fired.at) == ["running request"]
        assert deadline._timer is None
        other = Deadline(loop)
        other.set(3600, fired("cleared later"))
        other.close()
        assert other._timer is not None  # kept for the request that set it
        other.clear()
        assert other._timer is None

    run(main())
