"""KNN's approximate index (``index: ivf``): an inverted file of k-means lists, searched
exactly within the lists nearest each query.

An explicit option of the KNN postprocessor for banks too large to search exhaustively
(ImageNet-1K's 1.28M x 2048); the exact flat search (`distance.kth_nearest_distances`)
stays the default. It keeps no copy of the bank, so memory stays bounded:

- fit: nlist = floor(sqrt(N)) centroids by faiss's spherical k-means on a seeded sample of
  at most 39 x nlist unit bank rows (faiss's own rule of enough points per centroid); each
  unit bank row, read a block of ``BANK_ROWS`` at a time from the mapped fit features, joins
  the list of its nearest centroid (largest inner product). The index is the centroids
  (nlist x D float32) and the bank's row numbers grouped by list (8 bytes per row, 0.0075
  GiB per million images): faiss's IndexIVFFlat would hold a copy of every vector (7.6 GiB
  per million), and product-quantised codes (IndexIVFPQ, 64 bytes, re-ranked from 4-10x
  the candidates) found 0.49-0.56 of the 50 nearest rows of a 20k bank of 2,048-d
  ResNet-50-width synthetic features visiting 32 lists, where exact similarities within
  the same lists found 0.87.
- search: each query visits its ``IVF_PROBES`` nearest lists (more when K is large for the
  bank, so that they hold about twice K rows) and their rows, read from the mapped bank and
  normalised, are ranked by their exact inner products (float32, as the flat search).
  The similarities found are exact; a near neighbour in an unvisited list is missed, so
  the K-th distance can only grow.

Its recall@K against the exact search is printed by ``benchmarks/knn_scale.py`` and tested
on a synthetic bank (``tests/test_knn_backends.py``). The index is tensors, so the
fit-state cache keeps it.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch

from oodbench.errors import OodbenchError

IVF_PROBES = 8  # lists visited per query
IVF_SEED = 0
TRAINING_PER_CENTROID = 39  # faiss's k-means asks for at least 39 points per centroid


def require_faiss(what: str):
    """faiss, set to the run's threads, or one line saying how to install it (`OodbenchError`)."""
    if importlib.util.find_spec("faiss") is None:
        raise OodbenchError(f"{what} needs faiss (pip install 'oodbench[faiss]'); knn's index: flat searches "
                            "exactly without it")
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())  # the run's --threads
    return faiss


def build_ivf(bank: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
              block_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centroids nlist x D, bank row numbers grouped by list N, list offsets nlist + 1) of
    `prepare`'s unit rows of `bank` (N x D), assigned `block_rows` rows at a time."""
    faiss = require_faiss("knn: index 'ivf'")
    rows, dim = bank.shape
    lists = max(1, int(math.sqrt(rows)))
    sample = min(rows, TRAINING_PER_CENTROID * lists)
    chosen = torch.randperm(rows, generator=torch.Generator().manual_seed(IVF_SEED))[:sample].sort().values
    kmeans = faiss.Kmeans(dim, lists, niter=20, seed=IVF_SEED, spherical=True)
    kmeans.train(prepare(bank[chosen]).float().contiguous().numpy())
    centroids = torch.from_numpy(kmeans.centroids).float()
    assigned = torch.cat([(prepare(bank[start : start + block_rows]).float() @ centroids.T).argmax(dim=1)
                          for start in range(0, rows, block_rows)])
    order = assigned.argsort(stable=True)  # row numbers, list by list, each list in the bank's order
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(assigned, minlength=lists).cumsum(0)])
    return centroids, order, offsets


def ivf_best_similarities(queries: torch.Tensor, bank: torch.Tensor, ivf: tuple[torch.Tensor, ...], largest: int,
                          prepare: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """len(queries) x largest: the largest exact inner products of each unit query with the
    unit bank rows of the lists it visits, in decreasing order (-inf where they hold fewer)."""
    centroids, order, offsets = ivf
    lists = len(centroids)
    probes = min(lists, max(IVF_PROBES, math.ceil(2 * largest * lists / len(bank))))
    q = prepare(queries).float()
    visited = (q @ centroids.T).topk(probes, dim=1).indices  # Q x probes
    best = torch.full((len(q), largest), -torch.inf)
    for member in visited.unique().tolist():
        who = (visited == member).any(dim=1).nonzero()[:, 0]
        rows = prepare(bank[order[offsets[member] : offsets[member + 1]]]).float()
        found = (q[who] @ rows.T).topk(min(largest, len(rows)), dim=1).values
        best[who] = torch.cat([best[who], found], dim=1).topk(largest, dim=1).values
    return best
