"""k-means in torch: k-means++ seeding, then Lloyd iterations; deterministic in ``seed``.

    labels, centers = kmeans(x, k, seed=0)      # x [N, D] -> labels [N] long, centers [k, D]

Distances are computed in chunks of rows (``chunk``), so N can be large; ties go to the lower
cluster index (``argmin``), an empty cluster keeps its previous center. Float32 unless the
input is float64. CLIP-MoE clusters with scikit-learn's MiniBatchKMeans; full-batch Lloyd on
torch gives the same kind of partition without the dependency.
"""
from __future__ import annotations

import torch


def _sq_dists(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[n, D], [k, D] -> [n, k] squared Euclidean distances (>= 0)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centers.t() + (centers * centers).sum(1)
    return d.clamp_min_(0)


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest center [N] long, its squared distance [N])."""
    idx, dist = [], []
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], centers)
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values)
    return torch.cat(idx), torch.cat(dist)


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int = 65536
              ) -> torch.Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability
    proportional to the squared distance to the nearest chosen center. -> [k, D]."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    _, d2 = nearest(x, x[first:first + 1], chunk)
    for _ in range(1, k):
        total = float(d2.double().sum())
        if total <= 0:  # fewer distinct points than k: repeat a point (its cluster stays empty)
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(d2.double() / total, 1, generator=gen))
        centers.append(x[nxt])
        _, d_new = nearest(x, x[nxt:nxt + 1], chunk)
        d2 = torch.minimum(d2, d_new)
    return torch.stack(centers)


def lloyd(x: torch.Tensor, centers: torch.Tensor, iters: int = 100, chunk: int = 65536
          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations from ``centers`` until no label changes (or ``iters``).
    -> (labels [N], centers [k, D], iterations run)."""
    k = centers.shape[0]
    centers = centers.clone()
    labels = None
    for it in range(1, iters + 1):
        new, _ = nearest(x, centers, chunk)
        if labels is not None and torch.equal(new, labels):
            return labels, centers, it - 1
        labels = new
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    labels, _ = nearest(x, centers, chunk)
    return labels, centers, iters


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, chunk: int = 65536
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ then Lloyd. x [N, D] -> (labels [N] long, centers [k, D])."""
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"kmeans: need a [N, D] tensor with N >= k >= 1, got "
                         f"{tuple(x.shape)} and k={k}")
    x = x if x.dtype == torch.float64 else x.float()
    gen = torch.Generator().manual_seed(seed)
    labels, centers, _ = lloyd(x, kmeans_pp(x, k, gen, chunk), iters, chunk)
    return labels, centers
