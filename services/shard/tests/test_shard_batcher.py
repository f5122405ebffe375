"""Micro-batching, on CPU: merging, row routing, window, size limit, the lone large batch, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gmco_shard.batcher import MicroBatcher


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, object]] = []
        self.fail = fail

    async def run(self, queries: np.ndarray, key):
        self.calls.append((queries.shape[0], key))
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("device error")
        # Each row's "result" is its own first value, so routing mistakes are visible.
        return queries[:, 0].copy(), queries[:, 0] * 2


def q(rows: int, start: float) -> np.ndarray:
    return (np.arange(rows, dtype=np.float32)[:, None] + start) * np.ones((rows, 4), np.float32)


async def test_concurrent_calls_share_one_batch_and_get_their_own_rows() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.01, max_batch=1000)
    outs = await asyncio.gather(*(b.submit(q(i + 1, 100 * i), "k") for i in range(5)))
    assert rec.calls == [(15, "k")] and b.batches_run == 1
    for i, (first, double) in enumerate(outs):
        assert first.tolist() == (np.arange(i + 1) + 100 * i).tolist()
        assert np.array_equal(double, first * 2)


async def test_incompatible_keys_are_separate_batches() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.01, max_batch=1000)
    await asyncio.gather(b.submit(q(1, 0), ("k", 10)), b.submit(q(1, 1), ("k", 20)), b.submit(q(2, 2), ("k", 10)))
    assert sorted(rec.calls, key=str) == sorted([(3, ("k", 10)), (1, ("k", 20))], key=str)


async def test_full_batch_flushes_without_waiting_for_the_window() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=30.0, max_batch=4)  # a window no test would wait out
    outs = await asyncio.wait_for(asyncio.gather(b.submit(q(2, 0), "k"), b.submit(q(2, 10), "k")), 5)
    assert rec.calls == [(4, "k")] and outs[1][0].tolist() == [10, 11]


async def test_a_large_batch_alone_is_not_delayed() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=30.0, max_batch=8)
    first, _ = await asyncio.wait_for(b.submit(q(8, 0), "k"), 5)
    assert rec.calls == [(8, "k")] and len(first) == 8


async def test_window_flushes_a_partial_batch() -> None:
    rec = Recorder()
    b = MicroBatcher(rec.run, window=0.005, max_batch=100)
    first, _ = await asyncio.wait_for(b.submit(q(3, 7), "k"), 5)
    assert first.tolist() == [7, 8, 9]


async def test_errors_reach_every_caller_of_the_batch() -> None:
    b = MicroBatcher(Recorder(fail=True).run, window=0.01, max_batch=100)
    results = await asyncio.gather(b.submit(q(1, 0), "k"), b.submit(q(1, 1), "k"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, window=-1)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, max_batch=0)
