"""Micro-batching, on CPU: merging, row routing, keys, the window, the size limit, the lone large batch,
errors and cancellation reaching every caller."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gmco_shard.batcher import MicroBatcher

NEVER = 30.0  # a window no test waits out: reaching the end proves a flush happened without it


class Recorder:
    """A batch function that records each batch and answers, per row, the row's own first value."""

    def __init__(self, fail: bool = False, gate: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[int, object]] = []
        self.fail = fail
        self.gate = gate

    async def run(self, queries: np.ndarray, key) -> np.ndarray:
        self.calls.append((queries.shape[0], key))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("device error")
        return queries[:, 0].copy()


def rows(n: int, start: float) -> np.ndarray:
    return (np.arange(n, dtype=np.float32)[:, None] + start) * np.ones((n, 4), np.float32)


def mine(answer: tuple[np.ndarray, slice]) -> list[float]:
    result, part = answer
    return result[part].tolist()


async def test_concurrent_calls_share_one_batch_and_get_their_own_rows() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=NEVER, max_rows=15)  # 1+2+...+5 = 15 rows fill the batch exactly
    outs = await asyncio.wait_for(asyncio.gather(*(b.submit(rows(i + 1, 100 * i), "k") for i in range(5))), 5)
    assert rec.calls == [(15, "k")] and b.batches_run == 1
    for i, answer in enumerate(outs):
        assert mine(answer) == (np.arange(i + 1) + 100 * i).tolist()


async def test_the_window_sends_a_partial_batch() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.002, max_rows=100)
    outs = await asyncio.wait_for(asyncio.gather(b.submit(rows(3, 7), "k"), b.submit(rows(1, 50), "k")), 5)
    assert rec.calls == [(4, "k")]
    assert [mine(o) for o in outs] == [[7, 8, 9], [50]]


async def test_incompatible_keys_run_in_separate_batches() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.002, max_rows=100)
    outs = await asyncio.gather(b.submit(rows(1, 0), ("k", 10)), b.submit(rows(1, 1), ("k", 20)),
                                b.submit(rows(2, 2), ("k", 10)))
    assert sorted(rec.calls, key=str) == sorted([(3, ("k", 10)), (1, ("k", 20))], key=str)
    assert [mine(o) for o in outs] == [[0], [1], [2, 3]]


async def test_a_request_that_would_overflow_sends_the_waiting_group_first() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.002, max_rows=4)
    outs = await asyncio.wait_for(asyncio.gather(b.submit(rows(3, 0), "k"), b.submit(rows(2, 10), "k")), 5)
    assert [n for n, _ in rec.calls] == [3, 2]  # never a 5-row batch over the limit of 4
    assert [mine(o) for o in outs] == [[0, 1, 2], [10, 11]]


async def test_a_full_batch_is_sent_without_waiting_for_the_window() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=NEVER, max_rows=4)
    outs = await asyncio.wait_for(asyncio.gather(b.submit(rows(2, 0), "k"), b.submit(rows(2, 10), "k")), 5)
    assert rec.calls == [(4, "k")] and mine(outs[1]) == [10, 11]


async def test_a_large_batch_arriving_alone_runs_at_once() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=NEVER, max_rows=8)
    first = await asyncio.wait_for(b.submit(rows(8, 0), "k"), 5)
    bigger = await asyncio.wait_for(b.submit(rows(20, 0), "k"), 5)
    assert rec.calls == [(8, "k"), (20, "k")]
    assert len(mine(first)) == 8 and len(mine(bigger)) == 20


async def test_a_large_batch_does_not_wait_behind_a_small_group() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=NEVER, max_rows=8)
    small = asyncio.ensure_future(b.submit(rows(1, 0), "k"))
    await asyncio.sleep(0)
    big = await asyncio.wait_for(b.submit(rows(8, 100), "k"), 5)
    assert mine(big) == (np.arange(8) + 100).tolist() and not small.done()
    small.cancel()


async def test_window_zero_runs_every_call_directly() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0, max_rows=100)
    await asyncio.gather(b.submit(rows(1, 0), "k"), b.submit(rows(1, 1), "k"))
    assert rec.calls == [(1, "k"), (1, "k")]


async def test_errors_reach_every_caller_of_the_batch() -> None:
    b = MicroBatcher(Recorder(fail=True).run, window=0.002, max_rows=100)
    results = await asyncio.gather(b.submit(rows(1, 0), "k"), b.submit(rows(1, 1), "k"), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    gate = asyncio.Event()
    rec = Recorder(gate=gate)
    b = MicroBatcher(rec.run, window=0.001, max_rows=100)
    leaving = asyncio.ensure_future(b.submit(rows(1, 0), "k"))
    staying = asyncio.ensure_future(b.submit(rows(1, 5), "k"))
    while not rec.calls:  # the batch is running
        await asyncio.sleep(0.001)
    leaving.cancel()
    gate.set()
    assert mine(await asyncio.wait_for(staying, 5)) == [5]
    assert leaving.cancelled()


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, window=-1)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, max_rows=0)
