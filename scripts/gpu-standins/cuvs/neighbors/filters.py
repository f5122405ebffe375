"""Stand-in of ``cuvs.neighbors.filters``: a bitset is uint32 words, bit i % 32 of word i // 32 = row i."""

from __future__ import annotations

import numpy as np

from cuvs.neighbors._standin import device


class Prefilter:
    def __init__(self, kind: str, words: np.ndarray | None = None, parent=None) -> None:
        self.kind, self.words, self.parent = kind, words, parent

    def allowed(self, n: int) -> np.ndarray | None:
        if self.kind == "none":
            return None
        if self.words.shape[0] * 32 < n:
            raise ValueError(f"bitset of {self.words.shape[0]} words is too short for {n} rows")
        return np.unpackbits(self.words.view(np.uint8), count=n, bitorder="little").astype(bool)


def no_filter() -> Prefilter:
    return Prefilter("none")


def from_bitset(bitset) -> Prefilter:
    return Prefilter("bitset", device(bitset, "bitset", ("uint32",)), parent=bitset)


def from_bitmap(bitmap) -> Prefilter:
    return Prefilter("bitmap", device(bitmap, "bitmap", ("uint32",)), parent=bitmap)
