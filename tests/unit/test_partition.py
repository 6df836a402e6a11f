"""Partitioning's pure functions: balanced assignment, spherical k-means, random split."""

from __future__ import annotations

import numpy as np
import pytest

from workloads.partition import (balanced_assign, centroids_of, random_partition,
                                 spherical_kmeans)


def _blobs(n_per=(30, 20, 7), d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[: len(n_per)]
    x = np.concatenate([c + 0.05 * rng.standard_normal((n, d)) for c, n in zip(centers, n_per)])
    return x, np.repeat(np.arange(len(n_per)), n_per)


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    x, truth = _blobs()
    a1, c1 = spherical_kmeans(x, 3, seed=3)
    a2, c2 = spherical_kmeans(x, 3, seed=3)
    assert np.array_equal(a1, a2) and np.array_equal(c1, c2)
    # same clustering up to label permutation
    assert len({(int(t), int(a)) for t, a in zip(truth, a1)}) == 3
    assert np.allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n,k", [(57, 3), (10, 4), (12, 4), (5, 5)])
def test_balanced_sizes_differ_by_at_most_one(n, k):
    scores = np.random.default_rng(n).standard_normal((n, k))
    a = balanced_assign(scores)
    sizes = np.bincount(a, minlength=k)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and (a >= 0).all()


def test_balanced_assign_prefers_best_cluster_within_capacity():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.9]])
    assert balanced_assign(scores).tolist() == [0, 0, 1, 1]


def test_balanced_kmeans_on_unbalanced_blobs():
    x, _ = _blobs()
    a, _ = spherical_kmeans(x, 3, seed=0, balanced=True)
    assert np.bincount(a, minlength=3).tolist() == [19, 19, 19]


def test_random_partition_is_seeded_and_even():
    a = random_partition(11, 3, seed=1)
    assert np.array_equal(a, random_partition(11, 3, seed=1))
    assert not np.array_equal(a, random_partition(11, 3, seed=2))
    assert sorted(np.bincount(a).tolist()) == [3, 4, 4]


def test_centroids_of_empty_cluster_keeps_previous():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    prev = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = centroids_of(x, np.array([0, 0]), 3, previous=prev)
    assert np.allclose(c[0], [2 ** -0.5, 2 ** -0.5]) and np.allclose(c[2], [0.6, 0.8])
