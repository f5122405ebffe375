"""The bandit feature space, shared by the shards (which compute it) and rl_state (which ranks in it).

A candidate's features are its unit-normalised embedding times a fixed Gaussian random projection to
``bandit_dim`` dimensions (Johnson-Lindenstrauss: entries N(0, 1/d), so E|Px|^2 = |x|^2), generated from a
seed. The version names everything the features depend on, so a shard and an rl_state configured
differently refuse to mix their numbers instead of ranking silently wrong.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

DEFAULT_SEED = 20240601
DEFAULT_DIM = 32


def feature_version(media_dim: int, bandit_dim: int, seed: int) -> str:
    return f"jl-{media_dim}x{bandit_dim}-s{seed}"


@lru_cache(maxsize=8)
def projection(media_dim: int, bandit_dim: int, seed: int) -> np.ndarray:
    """The (media_dim, bandit_dim) float32 projection; read-only, the same in every process."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((media_dim, bandit_dim)) / np.sqrt(bandit_dim)).astype(np.float32)
    p.setflags(write=False)
    return p


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows as float32 scaled to unit L2 norm (zero rows stay zero)."""
    a = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norms == 0, 1.0, norms)


def features(vectors: np.ndarray, bandit_dim: int, seed: int) -> np.ndarray:
    """float32 (n, bandit_dim) bandit features of item vectors (n, media_dim).

    The projection is linear, so the rows are projected first and the (n, bandit_dim) result divided by
    their norms: one pass over the (n, media_dim) rows fewer than normalising them first, and no
    temporary of their size for the norms (a shard computes this for every candidate it returns)."""
    x = np.asarray(vectors, dtype=np.float32)
    out = x @ projection(x.shape[-1], bandit_dim, seed)
    norms = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    out /= np.where(norms == 0, np.float32(1), norms)
    return out
