"""SearchBatcher on its own: when misses are sent to the shards, and which ones share a Search."""

from __future__ import annotations

import asyncio

import numpy as np
from gmco.router.v1 import router_service_pb2 as pb
from gmco_router.recommend import Plan, SearchBatcher


def plan(user: str, cold: bool = False) -> Plan:
    p = Plan(user, pb.RecommendRequest(user_id=user, k=5), "")
    p.query = None if cold else np.ones(4, np.float32)
    return p


class Shards:
    """Records each call's users; a call can be held until released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def run(self, plans: list[Plan]) -> None:
        self.calls.append([p.user_id for p in plans])
        await self.hold.wait()


async def test_a_miss_on_an_idle_router_is_sent_at_once() -> None:
    shards = Shards()
    batcher = SearchBatcher(shards.run, window=60.0, max_rows=32)  # a window that would fail the test
    await asyncio.wait_for(batcher.search([plan("a")]), 2)
    await asyncio.wait_for(batcher.search([plan("b")]), 2)
    assert shards.calls == [["a"], ["b"]]


async def test_misses_arriving_while_a_search_is_in_flight_share_the_next_one() -> None:
    shards = Shards()
    batcher = SearchBatcher(shards.run, window=60.0, max_rows=32)
    shards.hold.clear()
    first = asyncio.ensure_future(batcher.search([plan("a")]))
    await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(batcher.search([plan(u)])) for u in ("b", "c", "d")]
    cold = asyncio.ensure_future(batcher.search([plan("e", cold=True)]))  # another kind: its own group
    await asyncio.sleep(0.05)
    assert shards.calls == [["a"], ["e"]]  # b, c, d wait for a's Search
    shards.hold.set()
    await asyncio.wait_for(asyncio.gather(first, cold, *waiting), 2)
    assert shards.calls == [["a"], ["e"], ["b", "c", "d"]]


async def test_a_miss_waits_at_most_the_window_and_a_full_group_goes_at_once() -> None:
    shards = Shards()
    batcher = SearchBatcher(shards.run, window=0.05, max_rows=3)
    shards.hold.clear()
    stuck = asyncio.ensure_future(batcher.search([plan("a")]))  # never returns until released
    await asyncio.sleep(0.01)
    late = asyncio.ensure_future(batcher.search([plan("b")]))
    await asyncio.sleep(0.2)
    assert shards.calls == [["a"], ["b"]]  # sent after the window although a's Search is still out
    full = [asyncio.ensure_future(batcher.search([plan(u)])) for u in ("c", "d", "e")]
    await asyncio.sleep(0.01)
    assert shards.calls[-1] == ["c", "d", "e"]  # max_rows reached: no wait for the window
    shards.hold.set()
    await asyncio.wait_for(asyncio.gather(stuck, late, *full), 2)


async def test_a_failed_search_fails_its_group_and_the_next_group_still_goes() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def run(plans: list[Plan]) -> None:
        calls.append([p.user_id for p in plans])
        if plans[0].user_id == "a":
            await release.wait()
            raise RuntimeError("shard exploded")

    batcher = SearchBatcher(run, window=60.0, max_rows=32)
    first = asyncio.ensure_future(batcher.search([plan("a")]))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.search([plan("b")]))
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 2)
    assert isinstance(results[0], RuntimeError) and results[1] is None
    assert calls == [["a"], ["b"]]


async def test_window_zero_sends_every_miss_alone() -> None:
    shards = Shards()
    batcher = SearchBatcher(shards.run, window=0.0, max_rows=32)
    shards.hold.clear()
    tasks = [asyncio.ensure_future(batcher.search([plan(u)])) for u in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    assert shards.calls == [["a"], ["b"], ["c"]]
    shards.hold.set()
    await asyncio.gather(*tasks)
