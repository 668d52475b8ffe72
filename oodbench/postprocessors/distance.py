"""Distance scores on penultimate features z, fitted on ID train outputs.

- MDS, Mahalanobis distance (Lee et al., NeurIPS 2018): class means mu_c and one
  covariance S tied across classes (train features around their class means);
  score = max_c -(z - mu_c)' S^+ (z - mu_c).
- RMDS, relative Mahalanobis distance (Ren et al., arXiv:2106.09022): subtracts the
  distance to one class-agnostic Gaussian (mu_0, S_0) of all train features;
  score = max_c [-(z - mu_c)' S^+ (z - mu_c) + (z - mu_0)' S_0^+ (z - mu_0)].
- MDS++ and RMDS++ (Mahalanobis++, Mueller & Hein, ICML 2025, arXiv:2505.18032; reference
  code github.com/mueller-mp/maha-norm): MDS and RMDS on L2-normalised features z / ||z||,
  for the fit and the scores alike. Normalising removes the feature norm, which varies far
  more than a Gaussian with a tied covariance allows (the paper's diagnosis); no
  hyperparameters.
- KNN (Sun et al., ICML 2022): score = -|| z/||z|| - b_(K) ||, the Euclidean distance
  to the K-th nearest L2-normalised train feature b, = sqrt(2 - 2 s_(K)) with s_(K) the
  K-th largest cosine similarity. Exact search: with faiss installed (``pip install
  'oodbench[faiss]'``) by ``faiss.knn`` (brute-force inner products, no copy of the bank,
  for ImageNet-size banks: 1.28M x 2048), else by blocks of test rows against the whole
  bank in torch; the two agree to float32 rounding (~1e-7), and the one used is part of
  the cell's key (`KNN.backend`). OpenOOD's faiss returns the squared distance, a
  monotone transform: same AUROC / FPR. A search sorts the nearest neighbours once, for
  its largest K, and reads every smaller K from it. ``index: flat`` (the default) is that
  exact search; ``index: ivf`` is an approximate one for very large banks
  (`oodbench.postprocessors.approximate`: k-means lists by faiss, exact distances within the
  lists nearest each query, no copy of the bank; it needs faiss), a hyperparameter, so its
  cells are keyed apart.

S^+ is the pseudo-inverse (dead ReLU units make S singular). Means, scatter matrices
and distances are computed in float64 over blocks of rows, so memory stays bounded by
one block plus the D x D matrices.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from oodbench.postprocessors.approximate import build_ivf, ivf_best_similarities, require_faiss
from oodbench.postprocessors.base import (BLOCK_ROWS, Integer, InvalidHyperparameter, OneOf, Outputs, Postprocessor,
                                          in_blocks)
from oodbench.postprocessors.streaming import column_mean
from oodbench.registry import register_postprocessor

BANK_BLOCK_ELEMENTS = 1 << 24  # test rows x bank rows of similarities held at once (64 MiB in float32)
BANK_ROWS = 1 << 14  # bank rows searched at once (128 MiB of 2048-d float32, normalised)
ALL_PAIRS_SHARE = 8  # faiss: every pair sorted when the K sought are >= 1/8 of the bank rows ...
ALL_PAIRS_LIMIT = 1 << 22  # ... and the pairs are at most this many (faiss's lists: 12 bytes a pair)


def class_means(features: torch.Tensor, labels: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present, their mean features in float64), accumulated over row blocks; with
    `keep` (N booleans), over the kept rows only, as ``class_means(features[keep], labels[keep])``
    but without that copy of the features (index_add_ adds the rows in order either way)."""
    if keep is not None:
        labels = labels[keep]
    classes = labels.unique()
    index = torch.searchsorted(classes, labels)
    sums = torch.zeros(len(classes), features.shape[1], dtype=torch.float64)
    done = 0
    for start in range(0, len(features), BLOCK_ROWS):
        block = features[start : start + BLOCK_ROWS]
        if keep is not None:
            block = block[keep[start : start + BLOCK_ROWS]]
        sums.index_add_(0, index[done : done + len(block)], block.double())
        done += len(block)
    counts = torch.bincount(index, minlength=len(classes)).double()
    return classes, sums / counts[:, None]


def precision(features: torch.Tensor, centre_of_row) -> torch.Tensor:
    """Pseudo-inverse of (1/N) sum_i (z_i - m_i)(z_i - m_i)' with m_i = centre_of_row(rows)."""
    scatter = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for start in range(0, len(features), BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        centred = features[rows].double() - centre_of_row(rows)
        scatter += centred.T @ centred
    return torch.linalg.pinv(scatter / len(features), hermitian=True)


def mahalanobis(z: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """N x K squared distances (z - mu_k)' P (z - mu_k) for one block of rows."""
    z = z.double()
    zp = z @ prec
    quad_z = (zp * z).sum(dim=1, keepdim=True)
    quad_mu = ((means @ prec) * means).sum(dim=1)
    return (quad_z - 2 * zp @ means.T + quad_mu).clamp_min(0)


@register_postprocessor("mds", "mahalanobis")
class Mahalanobis(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True

    def fit(self, train: Outputs, val: Outputs) -> None:
        classes, self.means = class_means(train.features, train.labels)
        index = torch.searchsorted(classes, train.labels)
        self.precision = precision(train.features, lambda rows: self.means[index[rows]])

    def class_distances(self, z: torch.Tensor) -> torch.Tensor:
        return mahalanobis(z, self.means, self.precision)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return in_blocks(lambda z: -self.class_distances(z).min(dim=1).values, outputs.features).float()


@register_postprocessor("rmds", "relative_mahalanobis")
class RelativeMahalanobis(Mahalanobis):
    def fit(self, train: Outputs, val: Outputs) -> None:
        super().fit(train, val)
        self.mean_all = column_mean(train.features)[None]
        self.precision_all = precision(train.features, lambda rows: self.mean_all)

    def score(self, outputs: Outputs) -> torch.Tensor:
        def relative(z: torch.Tensor) -> torch.Tensor:
            background = mahalanobis(z, self.mean_all, self.precision_all)[:, 0]
            return -self.class_distances(z).min(dim=1).values + background

        return in_blocks(relative, outputs.features).float()


def l2_normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


class UnitRows:
    """The rows of an N x D tensor scaled to unit L2 norm, each block as it is sliced: what the
    Mahalanobis fits and scores read (``len``, ``shape``, ``[a:b]``), with no N x D copy."""

    def __init__(self, features: torch.Tensor):
        self.features, self.shape = features, features.shape

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows) -> torch.Tensor:
        return l2_normalise(self.features[rows])  # row by row: the same values as normalising all


def on_unit_features(outputs: Outputs) -> Outputs:
    """`outputs` with each feature row scaled to unit L2 norm (Mahalanobis++), block by block."""
    return replace(outputs, features=UnitRows(outputs.features))


class OnUnitFeatures:
    """Mixed in before a Mahalanobis class: fits and scores the L2-normalised features."""

    def fit(self, train: Outputs, val: Outputs) -> None:
        super().fit(on_unit_features(train), val)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return super().score(on_unit_features(outputs))


@register_postprocessor("mds_pp", "mahalanobis_pp")
class MahalanobisPP(OnUnitFeatures, Mahalanobis):
    pass


@register_postprocessor("rmds_pp", "relative_mahalanobis_pp")
class RelativeMahalanobisPP(OnUnitFeatures, RelativeMahalanobis):
    pass


def knn_backend() -> str:
    """``faiss`` when it is installed, else ``torch``: how `kth_nearest_distances` searches."""
    return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"


def kth_distances(nearest: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """N x len(ks): sqrt(2 - 2 s_(k)) from each row's sorted largest unit inner products."""
    return torch.stack([(2 - 2 * nearest[:, k - 1]).clamp_min(0).sqrt() for k in ks], dim=1)


def faiss_largest(faiss, queries: np.ndarray, bank: np.ndarray, count: int) -> torch.Tensor:
    """queries x `count`: each float32 query row's `count` largest inner products with the
    float32 `bank` rows, in decreasing order, as ``faiss.knn`` (METRIC_INNER_PRODUCT) returns them.

    When `count` is a large share of the bank (at least 1/`ALL_PAIRS_SHARE`) and the pairs
    are few (at most `ALL_PAIRS_LIMIT`), faiss's range search with no radius lists every
    inner product and numpy sorts them: the values are bit for bit faiss.knn's (the same
    faiss routine computes them, BLAS blocks or, under 20 queries, its sequential loop, for
    either search; tested), at ~1/7 of its cost for count = bank rows (faiss.knn keeps large
    counts in a reservoir it re-partitions). A NaN pair is not listed: then faiss.knn."""
    if count * ALL_PAIRS_SHARE >= len(bank) and len(queries) * len(bank) <= ALL_PAIRS_LIMIT:
        found = faiss.RangeSearchResult(len(queries))
        faiss.range_search_inner_product(faiss.swig_ptr(queries), faiss.swig_ptr(bank), queries.shape[1],
                                         len(queries), len(bank), -np.inf, found)
        listed = int(faiss.rev_swig_ptr(found.lims, len(queries) + 1)[-1])
        if listed == len(queries) * len(bank):  # every query's pairs, one row each (`found` owns the memory)
            similarities = faiss.rev_swig_ptr(found.distances, listed).reshape(len(queries), len(bank))
            return torch.from_numpy(np.sort(similarities, axis=1)[:, : -count - 1 : -1].copy())
    return torch.from_numpy(faiss.knn(queries, bank, count, metric=faiss.METRIC_INNER_PRODUCT)[0])


def kth_nearest_distances(queries: torch.Tensor, bank: torch.Tensor, ks: list[int], backend: str = "torch",
                          prepare: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows) -> torch.Tensor:
    """N x len(ks): exact Euclidean distance from each unit-norm query to its k-th nearest
    unit-norm bank row, for each k of `ks` (one sort, of the largest k); the similarities
    from torch blocks of test rows against the bank, or from faiss (``backend``).

    `prepare` turns a block of rows of `queries` or `bank` into unit-norm rows (KNN passes
    its normalisation, so the bank can be the fit split's memory-mapped features and no
    normalised copy of it exists). A bank of more than `BANK_ROWS` rows is searched in
    blocks of that many, whose k best similarities are merged (exact: the k best of the
    union are among the blocks' k best); a smaller one is one block, as before."""
    largest = max(ks)

    if backend == "faiss":
        faiss = require_faiss("knn's faiss search")

        def best(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            base = prepare(rows).float().contiguous().numpy()
            return faiss_largest(faiss, q.float().contiguous().numpy(), base, min(largest, len(rows)))
        rows = max(1, BANK_BLOCK_ELEMENTS // largest)  # faiss's N x K results stay bounded
    else:
        def best(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return (q @ prepare(rows).T).topk(min(largest, len(rows)), dim=1).values
        rows = max(1, BANK_BLOCK_ELEMENTS // max(min(len(bank), BANK_ROWS), 1))
    bank_rows = max(BANK_ROWS, largest)

    def nearest(block: torch.Tensor) -> torch.Tensor:
        q = prepare(block)
        found = best(q, bank[:bank_rows])
        for start in range(bank_rows, len(bank), bank_rows):
            found = torch.cat([found, best(q, bank[start : start + bank_rows])], dim=1).topk(largest, dim=1).values
        return kth_distances(found, ks)

    return in_blocks(nearest, queries, rows=rows)


@register_postprocessor("knn")
class KNN(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True
    defaults = {"k": 50, "index": "flat"}
    ranges = {"k": Integer(ge=1), "index": OneOf("flat", "ivf")}  # k at most the fit samples, checked on the data
    fit_params = ("index",)
    grid_params = ("k",)
    fit_views = {"bank": "features"}  # the bank is the fit split's mapped features; only an ivf index is cached

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["index"] != "flat":
            require_faiss(f"knn: index '{self.params['index']}'")

    @staticmethod
    def backend() -> str:
        """The search this process uses (faiss or torch): part of the cell's key (`oodbench.identity.code_digest`)."""
        return knn_backend()

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.bank = train.features  # normalised block by block as it is searched: never copied
        ivf = build_ivf(self.bank, l2_normalise, BANK_ROWS) if self.params["index"] == "ivf" else (None,) * 3
        self.ivf_centroids, self.ivf_order, self.ivf_offsets = ivf

    def score(self, outputs: Outputs) -> torch.Tensor:
        score = self.score_grid(outputs, [{}])[0]
        if isinstance(score, InvalidHyperparameter):
            raise score
        return score

    def score_grid(self, outputs: Outputs, combos: list[dict]) -> list[torch.Tensor | InvalidHyperparameter]:
        ks = [int({**self.params, **combo}["k"]) for combo in combos]
        valid = sorted({k for k in ks if k <= len(self.bank)})
        if valid and self.ivf_centroids is not None:
            ivf = (self.ivf_centroids, self.ivf_order, self.ivf_offsets)
            nearest = in_blocks(lambda q: ivf_best_similarities(q, self.bank, ivf, max(valid), l2_normalise),
                                outputs.features)
            distances = kth_distances(nearest, valid)
        elif valid:
            distances = kth_nearest_distances(outputs.features, self.bank, valid, self.backend(), l2_normalise)
        return [-distances[:, valid.index(k)] if k in valid else
                InvalidHyperparameter(f"knn: k={k} must be between 1 and the {len(self.bank)} fit samples")
                for k in ks]
