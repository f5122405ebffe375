"""Row bitmaps: ``uint64`` words, row i = bit (i % 64) of word i // 64.

The layout of ``numpy.packbits(bitorder="little")`` viewed as little-endian uint64 words, so one bitmap
goes unchanged to faiss's ``IDSelectorBitmap``, to the gmco_kernels scans and to cuVS's bitset (whose
uint32 words are the same bytes). Operations are whole-word numpy calls: O(rows / 64).
"""

from __future__ import annotations

import numpy as np


def words_for(n: int) -> int:
    return (n + 63) // 64


def empty(n: int) -> np.ndarray:
    return np.zeros(words_for(n), np.uint64)


def full(n: int) -> np.ndarray:
    """Every row 0..n-1 set (the bits past n clear)."""
    words = np.full(words_for(n), np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    if n % 64:
        words[-1] = np.uint64((1 << (n % 64)) - 1)
    return words


def from_bools(mask: np.ndarray) -> np.ndarray:
    packed = np.packbits(np.asarray(mask, bool), bitorder="little")
    pad = (-packed.shape[0]) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
    return packed.view("<u8").astype(np.uint64, copy=False)


def to_bools(words: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), count=n, bitorder="little").astype(bool)


def from_rows(rows: np.ndarray, n: int) -> np.ndarray:
    words = empty(n)
    set_rows(words, rows)
    return words


def set_rows(words: np.ndarray, rows: np.ndarray) -> None:
    r = np.asarray(rows, np.int64)
    np.bitwise_or.at(words, r >> 6, np.left_shift(np.uint64(1), (r & 63).astype(np.uint64)))


def clear_rows(words: np.ndarray, rows: np.ndarray) -> None:
    r = np.asarray(rows, np.int64)
    np.bitwise_and.at(words, r >> 6, ~np.left_shift(np.uint64(1), (r & 63).astype(np.uint64)))


def test_row(words: np.ndarray, row: int) -> bool:
    return bool((int(words[row >> 6]) >> (row & 63)) & 1)


def count(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum(dtype=np.int64))
