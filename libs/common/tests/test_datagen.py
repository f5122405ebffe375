from __future__ import annotations

import numpy as np
from gmco_common.datagen import (
    exact_ground_truth,
    generate_catalogue,
    generate_queries,
    generate_users,
    load_catalogue,
    load_users,
    main,
    save_catalogue,
)


def test_catalogue_is_clustered_not_uniform() -> None:
    cat = generate_catalogue(3000, dim=64, n_clusters=10, seed=3)
    v = cat.vectors.astype(np.float32)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-2)
    own = np.einsum("nd,nd->n", v, cat.centroids[cat.cluster])
    other = v @ cat.centroids.T
    # Items sit much closer to their own centroid than to the others (uniform noise would not).
    assert own.mean() > 0.5 > np.median(other)
    assert (cat.genre_ids[:, 0] >= 0).all() and cat.genre_ids.max() < 100
    assert cat.rating.max() < 6 and (cat.region_mask > 0).all() and (cat.format_mask > 0).all()
    # The primary genre follows the cluster.
    for c in np.unique(cat.cluster)[:5]:
        assert len(np.unique(cat.genre_ids[cat.cluster == c, 0])) == 1
    # Zipf popularity: a few items hold most of it.
    top = np.sort(cat.popularity)[::-1]
    assert top[:30].sum() > top[30:].sum() * 0.5


def test_deterministic_round_trip_and_ground_truth(tmp_path) -> None:
    a = generate_catalogue(500, dim=16, n_clusters=5, seed=7)
    b = generate_catalogue(500, dim=16, n_clusters=5, seed=7)
    assert np.array_equal(a.vectors, b.vectors)
    save_catalogue(a, tmp_path)
    c = load_catalogue(tmp_path)
    assert np.array_equal(c.vectors, a.vectors) and np.array_equal(c.region_mask, a.region_mask)
    q = generate_queries(a, 4)
    gt = exact_ground_truth(a.vectors, q, 5)
    brute = np.argsort(-(q @ a.vectors.astype(np.float32).T), axis=1)[:, :5]
    assert np.array_equal(gt, brute)
    mask = np.zeros(500, bool)
    mask[:3] = True
    gt_f = exact_ground_truth(a.vectors, q, 5, mask)
    assert set(gt_f[0][:3]) == {0, 1, 2} and (gt_f[:, 3:] == -1).all()
    users = generate_users(a, 10)
    assert users.preferences.shape == (10, 16) and len(users.user_ids) == 10


def test_cli_writes_everything(tmp_path) -> None:
    main(["--out", str(tmp_path), "--items", "300", "--dim", "8", "--users", "5", "--queries", "3", "--k", "4"])
    cat = load_catalogue(tmp_path)
    gt = np.load(tmp_path / "ground_truth.npy")
    assert gt.shape == (3, 4) and len(cat) == 300
    want = exact_ground_truth(cat.vectors, np.load(tmp_path / "queries.npy"), 4)
    assert np.array_equal(gt, cat.media_ids[want])  # ground truth holds media ids, best first
    users = load_users(tmp_path)
    assert users.user_ids == [f"u{i}" for i in range(5)] and users.preferences.shape == (5, 8)
    assert np.allclose(users.cluster_weights.sum(1), 1)
