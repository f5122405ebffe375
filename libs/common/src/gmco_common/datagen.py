"""Synthetic catalogue with real structure, for tests, demos and recall figures.

Embeddings are drawn from a mixture of genre clusters on the unit sphere (a von Mises-Fisher-like
mixture: centroid plus isotropic noise, renormalised), never uniform noise. Attributes correlate with
the clusters: each cluster has a primary genre, a typical rating, regions and formats. Popularity is
Zipf. Users hold hidden preference vectors mixed from one to three cluster centroids. Queries are
perturbed user preferences; ground truth is exact inner-product search.

    python -m gmco_common.datagen --items 100000 --dim 1024 --out data/catalogue
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from gmco.common.v1 import common_pb2
from tqdm import tqdm

from gmco_common.vectors import encode_vector, normalize

_CHUNK = 8192


@dataclass
class Catalogue:
    media_ids: np.ndarray  # uint64 (N,)
    vectors: np.ndarray  # float16 (N, D), unit norm
    genre_ids: np.ndarray  # int32 (N, 3), -1 padded
    rating: np.ndarray  # uint8 (N,)
    region_mask: np.ndarray  # uint64 (N,)
    format_mask: np.ndarray  # uint64 (N,)
    release_year: np.ndarray  # uint16 (N,)
    popularity: np.ndarray  # float32 (N,)
    cluster: np.ndarray  # int32 (N,)
    centroids: np.ndarray  # float32 (C, D)

    def __len__(self) -> int:
        return int(self.media_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def attributes(self, i: int) -> common_pb2.MediaAttributes:
        return common_pb2.MediaAttributes(
            genre_ids=[int(g) for g in self.genre_ids[i] if g >= 0],
            rating=int(self.rating[i]),
            region_mask=int(self.region_mask[i]),
            format_mask=int(self.format_mask[i]),
            release_year=int(self.release_year[i]),
            popularity=float(self.popularity[i]),
        )

    def media_item(self, i: int) -> common_pb2.MediaItem:
        return common_pb2.MediaItem(
            media_id=int(self.media_ids[i]), vector=encode_vector(self.vectors[i]), attributes=self.attributes(i)
        )

    def subset(self, rows: np.ndarray) -> Catalogue:
        return Catalogue(**{f.name: getattr(self, f.name)[rows] if f.name != "centroids" else self.centroids
                            for f in fields(self)})


@dataclass
class Users:
    user_ids: list[str]
    preferences: np.ndarray  # float32 (U, D), unit norm; hidden ground truth
    cluster_weights: np.ndarray  # float32 (U, C)


def _bits(rng: np.random.Generator, n_bits: int, p: np.ndarray) -> np.ndarray:
    """uint64 masks with bit b set with probability p[..., b]; never empty."""
    draws = rng.random((p.shape[0], n_bits)) < p
    draws[np.arange(p.shape[0]), rng.integers(0, n_bits, p.shape[0])] = True
    weights = (np.uint64(1) << np.arange(n_bits, dtype=np.uint64))
    return (draws.astype(np.uint64) * weights).sum(axis=1).astype(np.uint64)


def generate_catalogue(n_items: int, dim: int = 1024, n_clusters: int = 100, seed: int = 0, n_genres: int = 100,
                       n_regions: int = 8, n_formats: int = 8, n_rating_levels: int = 6,
                       spread: float = 0.9, progress: bool = False) -> Catalogue:
    """``spread`` is the noise scale relative to the centroid (higher = looser clusters)."""
    if n_items <= 0 or dim <= 0 or n_clusters <= 0:
        raise ValueError("n_items, dim and n_clusters must be > 0")
    rng = np.random.default_rng(seed)
    centroids = normalize(rng.standard_normal((n_clusters, dim)))
    # Cluster-level traits that items inherit with noise.
    primary_genre = rng.permutation(np.resize(np.arange(n_genres), n_clusters))
    cluster_rating = rng.integers(0, n_rating_levels, n_clusters)
    region_p = rng.uniform(0.2, 0.95, (n_clusters, n_regions))
    format_p = rng.uniform(0.2, 0.9, (n_clusters, n_formats))
    cluster_year = rng.integers(1960, 2025, n_clusters)
    cluster_size = rng.zipf(1.3, n_clusters).clip(1, 50).astype(np.float64)
    cluster = rng.choice(n_clusters, n_items, p=cluster_size / cluster_size.sum()).astype(np.int32)

    vectors = np.empty((n_items, dim), dtype=np.float16)
    noise_scale = spread / np.sqrt(dim)
    for start in tqdm(range(0, n_items, _CHUNK), desc="embeddings", unit="chunk", disable=not progress):
        c = cluster[start:start + _CHUNK]
        block = centroids[c] + rng.standard_normal((len(c), dim), dtype=np.float32) * noise_scale
        vectors[start:start + len(c)] = normalize(block)

    genre_ids = np.full((n_items, 3), -1, dtype=np.int32)
    genre_ids[:, 0] = primary_genre[cluster]
    extra = rng.random(n_items)
    genre_ids[extra < 0.6, 1] = rng.integers(0, n_genres, int((extra < 0.6).sum()))
    genre_ids[extra < 0.2, 2] = rng.integers(0, n_genres, int((extra < 0.2).sum()))
    rating = np.clip(cluster_rating[cluster] + rng.integers(-1, 2, n_items), 0, n_rating_levels - 1).astype(np.uint8)
    ranks = rng.permutation(n_items) + 1
    popularity = (1.0 / ranks.astype(np.float64) ** 1.1)
    popularity = (popularity / popularity.max()).astype(np.float32)
    return Catalogue(
        media_ids=(np.arange(n_items, dtype=np.uint64) + np.uint64(1)),
        vectors=vectors,
        genre_ids=genre_ids,
        rating=rating,
        region_mask=_bits(rng, n_regions, region_p[cluster]),
        format_mask=_bits(rng, n_formats, format_p[cluster]),
        release_year=np.clip(cluster_year[cluster] + rng.integers(-8, 9, n_items), 1950, 2026).astype(np.uint16),
        popularity=popularity,
        cluster=cluster,
        centroids=centroids.astype(np.float32),
    )


def generate_users(cat: Catalogue, n_users: int, seed: int = 1) -> Users:
    rng = np.random.default_rng(seed)
    n_clusters = cat.centroids.shape[0]
    weights = np.zeros((n_users, n_clusters), dtype=np.float32)
    for u in range(n_users):
        picks = rng.choice(n_clusters, rng.integers(1, 4), replace=False)
        weights[u, picks] = rng.dirichlet(np.ones(len(picks)))
    prefs = normalize(weights @ cat.centroids + rng.standard_normal((n_users, cat.dim)).astype(np.float32) * 0.3 / np.sqrt(cat.dim))
    return Users([f"u{u}" for u in range(n_users)], prefs, weights)


def generate_queries(cat: Catalogue, n_queries: int, seed: int = 2) -> np.ndarray:
    """Queries near the data: perturbed mixes of cluster centroids, as user vectors are."""
    users = generate_users(cat, n_queries, seed)
    rng = np.random.default_rng(seed + 1)
    return normalize(users.preferences + rng.standard_normal(users.preferences.shape).astype(np.float32) * 0.5 / np.sqrt(cat.dim))


def exact_ground_truth(vectors: np.ndarray, queries: np.ndarray, k: int, allow_mask: np.ndarray | None = None,
                       chunk: int = 65536, progress: bool = False) -> np.ndarray:
    """Row indices (not ids) of the exact inner-product top-k, -1 where fewer than k rows are allowed."""
    q = np.asarray(queries, dtype=np.float32)
    best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for start in tqdm(range(0, vectors.shape[0], chunk), desc="ground truth", unit="chunk", disable=not progress):
        block = np.asarray(vectors[start:start + chunk], dtype=np.float32)
        scores = q @ block.T
        if allow_mask is not None:
            scores[:, ~allow_mask[start:start + chunk]] = -np.inf
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(s, top, 1)
        best_i = np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1)
    best_i = np.take_along_axis(best_i, order, 1)
    best_i[np.take_along_axis(best_s, order, 1) == -np.inf] = -1
    return best_i


_ARRAYS = [f.name for f in fields(Catalogue)]


def save_catalogue(cat: Catalogue, out_dir: Path | str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(out / f"{name}.npy", getattr(cat, name))
    (out / "meta.json").write_text(json.dumps({"items": len(cat), "dim": cat.dim, "clusters": int(cat.centroids.shape[0]),
                                              "format": 1, "arrays": _ARRAYS}))
    return out


def save_users(users: Users, out_dir: Path | str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "user_ids.npy", np.asarray(users.user_ids))
    np.save(out / "user_preferences.npy", users.preferences)
    np.save(out / "user_cluster_weights.npy", users.cluster_weights)


def load_users(path: Path | str) -> Users:
    root = Path(path)
    return Users([str(u) for u in np.load(root / "user_ids.npy")], np.load(root / "user_preferences.npy"),
                 np.load(root / "user_cluster_weights.npy"))


def load_catalogue(path: Path | str, mmap: bool = True) -> Catalogue:
    root = Path(path)
    if not (root / "meta.json").is_file():
        raise FileNotFoundError(f"{root} is not a catalogue directory (no meta.json); create one with "
                                "`python -m gmco_common.datagen --out {root}`")
    mode = "r" if mmap else None
    return Catalogue(**{name: np.load(root / f"{name}.npy", mmap_mode=mode) for name in _ARRAYS})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m gmco_common.datagen",
        description="Write a synthetic clustered catalogue, users, queries and exact ground truth.",
        epilog="Files: one .npy per Catalogue field + meta.json (load_catalogue), user_ids/user_preferences/"
               "user_cluster_weights.npy (load_users), queries.npy (float32) and ground_truth.npy (media ids of "
               "the exact inner-product top-k per query, 0 = none).")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--items", type=int, default=100_000, help="catalogue size")
    p.add_argument("--dim", type=int, default=1024, help="embedding dimension")
    p.add_argument("--clusters", type=int, default=100, help="genre clusters in the mixture")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users with hidden preferences")
    p.add_argument("--queries", type=int, default=1_000, help="query vectors with exact ground truth")
    p.add_argument("--k", type=int, default=100, help="ground-truth depth")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cat = generate_catalogue(a.items, a.dim, a.clusters, a.seed, progress=True)
    save_catalogue(cat, a.out)
    save_users(generate_users(cat, a.users, a.seed + 1), a.out)
    if a.queries:
        queries = generate_queries(cat, a.queries, a.seed + 2)
        np.save(a.out / "queries.npy", queries)
        gt_rows = exact_ground_truth(cat.vectors, queries, min(a.k, len(cat)), progress=True)
        np.save(a.out / "ground_truth.npy", np.where(gt_rows >= 0, cat.media_ids[gt_rows], 0).astype(np.uint64))
    print(f"wrote {len(cat)} x {cat.dim} items, {a.users} users, {a.queries} queries to {a.out}")


if __name__ == "__main__":
    main()
