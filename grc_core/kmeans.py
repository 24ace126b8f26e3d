"""Batched k-means and the residual k-means item tokenizer.

`kmeans` is Lloyd's algorithm with k-means++ seeding (Arthur & Vassilvitskii 2007). It
initialises the RQ-VAE codebooks (`grc_core.rqvae`), and `residual_kmeans` stacks it into
a tokenizer with no encoder or decoder: level l clusters what the levels before it left
over, x - sum_{j<l} C_j[c_j] (the "RQ-KMeans" baseline of the semantic-ID literature).
`residual_quantise` is the shared encoder: greedy nearest-code residual quantisation, as
in RQ-VAE (Lee et al. 2022, Sec. 3.1).

Choices and deviations:
- Empty clusters are re-seeded from the points farthest from their own centroid (distinct
  points, farthest first), so every centroid ends up owning data when there is enough of it.
- N < k is an error: k-means cannot give k clusters of fewer than k points.
- Ties in a nearest-centroid search go to the lowest index, so results are deterministic on
  CPU for a given seed (on CUDA up to float non-associativity in the matmul).
- Lloyd stops early once no assignment changes; the returned `assign` is always the nearest
  centroid of the returned `centroids`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# Rows per distance block: bounds memory at _CHUNK * k floats however large N is.
_CHUNK = 16384


class KMeansResult(NamedTuple):
    centroids: torch.Tensor  # (K, D) float
    assign: torch.Tensor  # (N,) int64, index of the nearest centroid


class ResidualCodes(NamedTuple):
    codes: torch.Tensor  # (N, L) int64
    last_level_distances: torch.Tensor  # (N, K) squared distances of the last residual to C_L
    final_residual: torch.Tensor  # (N, D) x - sum_l C_l[c_l]


class ResidualKMeansResult(NamedTuple):
    codes: torch.Tensor  # (N, L) int64
    codebooks: list[torch.Tensor]  # L x (K, D)


def make_generator(seed: int | torch.Generator, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator from a seed (or the generator itself, passed through)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(int(seed))


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """||x_i - c_j||^2 for all pairs, clamped at 0 against cancellation."""
    x2 = (x * x).sum(1, keepdim=True)  # (N, 1)
    c2 = (centroids * centroids).sum(1)  # (K,)
    return (x2 - 2.0 * x @ centroids.T + c2).clamp_min_(0.0)  # (N, K)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (N,), squared distance (N,)) of each row's nearest centroid, in row blocks."""
    idx, dist = [], []
    for start in range(0, x.shape[0], _CHUNK):
        d = squared_distances(x[start : start + _CHUNK], centroids)  # (n, K)
        m, i = d.min(1)  # (n,)
        idx.append(i)
        dist.append(m)
    return torch.cat(idx), torch.cat(dist)  # (N,), (N,)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to D(x)^2.

    When every point already coincides with a centroid (fewer than k distinct points) the
    remaining centroids are drawn uniformly; Lloyd's empty-cluster handling copes with the
    duplicates.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centroids = [x[first]]
    d2 = squared_distances(x, x[first : first + 1]).squeeze(1)  # (N,)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            nxt = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        centroids.append(x[nxt])
        d2 = torch.minimum(d2, squared_distances(x, x[nxt : nxt + 1]).squeeze(1))
    return torch.stack(centroids)  # (K, D)


def _as_points(x: torch.Tensor | np.ndarray, k: int, what: str) -> torch.Tensor:
    x = x if torch.is_tensor(x) else torch.tensor(np.asarray(x))
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: x must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: x must be floating point, got {x.dtype}")
    if k < 1:
        raise ValueError(f"{what}: k must be >= 1, got {k}")
    if x.shape[0] < k:
        raise ValueError(f"{what}: needs at least k={k} points, got N={x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: x contains NaN or inf")
    return x.float()


def reseed_empty(
    x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, dist: torch.Tensor
) -> torch.Tensor:
    """Move each empty centroid onto one of the points farthest from their own centroid."""
    empty = torch.nonzero(counts == 0).squeeze(1)  # (E,)
    if empty.numel() == 0:
        return centroids
    far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]  # (E,)
    centroids = centroids.clone()
    centroids[empty] = x[far]
    return centroids


def kmeans(
    x: torch.Tensor | np.ndarray, k: int, iters: int = 20, seed: int | torch.Generator = 0
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding; empty clusters re-seeded from the farthest points.

    `seed` is an int or a torch.Generator on x's device (drawn from, so successive calls on one
    generator differ but the sequence is reproducible). `iters` = 0 returns the k-means++ seeds.
    """
    x = _as_points(x, k, "kmeans")
    if iters < 0:
        raise ValueError(f"kmeans: iters must be >= 0, got {iters}")
    gen = make_generator(seed, x.device)
    centroids = kmeans_plus_plus(x, k, gen)  # (K, D)
    assign, dist = nearest_centroid(x, centroids)  # (N,), (N,)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (K,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (K, D)
        updated = sums / counts.clamp_min(1.0).unsqueeze(1)
        centroids = torch.where((counts > 0).unsqueeze(1), updated, centroids)
        centroids = reseed_empty(x, centroids, counts, dist)
        new_assign, dist = nearest_centroid(x, centroids)
        if torch.equal(new_assign, assign) and bool((counts > 0).all()):
            break
        assign = new_assign
    assign, _ = nearest_centroid(x, centroids)
    return KMeansResult(centroids, assign)


def residual_quantise(x: torch.Tensor, codebooks: list[torch.Tensor] | torch.Tensor) -> ResidualCodes:
    """Greedy residual quantisation: c_l = argmin_k ||r_l - C_l[k]||, r_{l+1} = r_l - C_l[c_l]."""
    if len(codebooks) == 0:
        raise ValueError("residual_quantise: needs at least one codebook")
    r = x
    codes = []
    d = x.new_zeros((x.shape[0], 0))
    for book in codebooks:
        d = squared_distances(r, book)  # (N, K)
        c = d.argmin(1)  # (N,)
        codes.append(c)
        r = r - book[c]
    return ResidualCodes(torch.stack(codes, 1), d, r)  # (N, L), (N, K), (N, D)


def residual_kmeans(
    x: torch.Tensor | np.ndarray, num_levels: int, k: int, iters: int = 20, seed: int | torch.Generator = 0
) -> ResidualKMeansResult:
    """Residual k-means tokenizer: level l runs k-means on x - sum_{j<l} C_j[c_j].

    One generator is drawn from level after level, so the whole tokenisation is a function of
    (x, num_levels, k, iters, seed).
    """
    r = _as_points(x, k, "residual_kmeans")
    if num_levels < 1:
        raise ValueError(f"residual_kmeans: num_levels must be >= 1, got {num_levels}")
    gen = make_generator(seed, r.device)
    codes, books = [], []
    for _ in range(num_levels):
        centroids, assign = kmeans(r, k, iters, gen)  # (K, D), (N,)
        codes.append(assign)
        books.append(centroids)
        r = r - centroids[assign]
    return ResidualKMeansResult(torch.stack(codes, 1), books)  # (N, L)
