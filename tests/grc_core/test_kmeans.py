import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grc_core.kmeans import (
    kmeans,
    reseed_empty,
    residual_kmeans,
    residual_quantise,
    squared_distances,
)


def four_clusters(per: int = 25, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four clusters at +-10 e_0 and +-10 e_1 with N(0, 0.1^2) noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, dim)
    centres[0, 0], centres[1, 0], centres[2, 1], centres[3, 1] = 10.0, -10.0, 10.0, -10.0
    label = torch.arange(4).repeat_interleave(per)
    x = centres[label] + 0.1 * torch.randn(4 * per, dim, generator=g)
    return x, label


def assert_splits_clusters(codes: torch.Tensor, label: torch.Tensor) -> None:
    """Items of one cluster share a code, and different clusters have different codes."""
    per_cluster = [codes[label == c].unique() for c in label.unique()]
    assert all(len(u) == 1 for u in per_cluster)
    assert len({int(u) for u in per_cluster}) == len(per_cluster)


def test_kmeans_two_clusters_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [100.0, 0.0], [100.0, 1.0]])
    centroids, assign = kmeans(x, 2, iters=10, seed=0)
    # Each centroid is the mean of its pair: (0, 0.5) and (100, 0.5).
    order = centroids[:, 0].argsort()
    torch.testing.assert_close(centroids[order], torch.tensor([[0.0, 0.5], [100.0, 0.5]]))
    assert assign[0] == assign[1] != assign[2] == assign[3]


def test_kmeans_splits_separated_clusters_and_assigns_to_nearest():
    x, label = four_clusters()
    centroids, assign = kmeans(x, 4, iters=20, seed=3)
    assert_splits_clusters(assign, label)
    torch.testing.assert_close(assign, squared_distances(x, centroids).argmin(1))


def test_kmeans_is_deterministic_given_a_seed():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 7, 15, seed=11)
    b = kmeans(x, 7, 15, seed=11)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assign, b.assign)


def test_kmeans_refuses_fewer_points_than_clusters():
    with pytest.raises(ValueError, match="needs at least k=5 points, got N=3"):
        kmeans(torch.zeros(3, 2), 5)


def test_kmeans_copes_with_fewer_distinct_points_than_clusters():
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    centroids, assign = kmeans(x, 3, iters=5, seed=0)
    # Only two distinct values exist: every centroid sits on one of them, and both are covered.
    assert set(centroids.squeeze(1).tolist()) == {0.0, 1.0}
    assert torch.equal(x[:, 0], centroids[assign, 0])


def test_reseed_empty_moves_an_empty_centroid_onto_the_farthest_point():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    centroids = torch.tensor([[0.5], [100.0]])
    counts = torch.tensor([3, 0])
    dist = torch.tensor([0.25, 0.25, 20.25])  # squared distances to centroid 0
    out = reseed_empty(x, centroids, counts, dist)
    torch.testing.assert_close(out, torch.tensor([[0.5], [5.0]]))


def test_residual_kmeans_by_hand():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    codes, books = residual_kmeans(x, num_levels=2, k=2, iters=10, seed=0)
    # Level 1: centroids {0.5, 10.5}; residuals -0.5, 0.5, -0.5, 0.5; level 2: centroids {-0.5, 0.5}.
    torch.testing.assert_close(books[0].squeeze(1).sort().values, torch.tensor([0.5, 10.5]))
    torch.testing.assert_close(books[1].squeeze(1).sort().values, torch.tensor([-0.5, 0.5]))
    assert codes[0, 0] == codes[1, 0] != codes[2, 0] == codes[3, 0]
    assert codes[0, 1] == codes[2, 1] != codes[1, 1] == codes[3, 1]
    recon = books[0][codes[:, 0]] + books[1][codes[:, 1]]
    torch.testing.assert_close(recon, x)
    assert codes.dtype == torch.int64 and codes.shape == (4, 2)
    assert torch.equal(residual_kmeans(x.numpy(), 2, 2, 10, 0).codes, codes)  # numpy in, same codes


def test_residual_kmeans_splits_clusters_at_level_one():
    x, label = four_clusters()
    codes, books = residual_kmeans(x, num_levels=3, k=4, iters=20, seed=0)
    assert_splits_clusters(codes[:, 0], label)
    assert len(books) == 3 and books[0].shape == (4, 8)


def test_residual_quantise_reproduces_residual_kmeans_codes():
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(2))
    codes, books = residual_kmeans(x, num_levels=3, k=8, iters=10, seed=5)
    enc = residual_quantise(x, books)
    assert torch.equal(enc.codes, codes)
    assert enc.last_level_distances.shape == (120, 8)
    torch.testing.assert_close(enc.final_residual, x - sum(b[codes[:, i]] for i, b in enumerate(books)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 6), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_kmeans_assigns_every_point_to_a_nearest_centroid(n, dim, k, iters, seed):
    k = min(k, n)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).round(decimals=1)
    centroids, assign = kmeans(x, k, iters, seed)
    d = squared_distances(x, centroids)
    assert centroids.shape == (k, dim) and torch.isfinite(centroids).all()
    torch.testing.assert_close(d.gather(1, assign[:, None]).squeeze(1), d.min(1).values)
