"""Bootstrap confidence intervals for AUROC and FPR@95, vectorised over resamples.

A resample draws the ID test images and each OOD test set's images with replacement,
each set on its own (n of n ID images, m of m OOD images), and recomputes the metric.
Resample ``b`` of a set of ``size`` images named ``stream`` is drawn by its own generator,
seeded by (seed, the set's name and size, b) (`resample_indices`): so it is the same for
every method scored on those images — the bootstrap is *paired*, and the difference of
two methods' replicates is the bootstrap distribution of their difference — and it does
not depend on which methods or other sets a table holds, nor on how resamples are
batched.

A resample is represented by how many times it draws each image (`resample_counts`),
and every metric is read off weighted cumulative counts over the sorted scores, for a
batch of resamples at once:

- AUROC = sum_i w_i (#OOD below s_i + 1/2 #OOD tied with s_i) / (n m), with w_i the count
  of ID image i and the OOD counts weighted the same way (ties count one half, as in
  scikit-learn);
- classic FPR@95 (ID positive): the threshold is the largest ID score keeping
  ceil(0.95 n) of the drawn ID images at or above it; FPR = share of drawn OOD images at
  or above it;
- OpenOOD FPR@95 (OOD positive): the first score value v where the drawn OOD images at
  or below v reach 95%; FPR = share of drawn ID images at or below v. This equals
  OpenOOD's ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(is_ood, -score)`` whenever no score
  value is shared by an ID and an OOD image (scikit-learn's dropping of collinear ROC
  points can only move that point when such ties exist).

Intervals are percentile intervals (`interval`); `not_significant` compares each method
with the best by the paired replicates of their difference.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Hashable, Mapping

import numpy as np

from oodbench.metrics.detection import kept_count

RESAMPLES = 1000
LEVEL = 0.95
TPR = 0.95
CHUNK_ELEMENTS = 20_000_000  # resample counts held at once per set: images x resamples per batch
FPR_CONVENTIONS = ("classic", "openood")


def stream_of(name: str, size: int) -> int:
    """The generator stream of a set: its name and size (a set of another size draws other resamples)."""
    return zlib.crc32(f"{name}\0{size}".encode())


def resample_indices(size: int, replicate: int, seed: int, stream: int) -> np.ndarray:
    """The images (indices into the set) that resample `replicate` draws, with replacement."""
    rng = np.random.default_rng([seed, stream, replicate])
    return rng.integers(0, size, size)


def resample_counts(size: int, replicates: range, seed: int, stream: int) -> np.ndarray:
    """(size, len(replicates)) int32: how many times each resample (column) draws each image (row)."""
    counts = np.empty((size, len(replicates)), dtype=np.int32)
    for column, replicate in enumerate(replicates):
        counts[:, column] = np.bincount(resample_indices(size, replicate, seed, stream), minlength=size)
    return counts


@dataclass
class _Sorted:
    """One method's scores on one set, sorted once for every batch of resamples."""

    scores: np.ndarray
    order: np.ndarray = field(init=False)
    ranked: np.ndarray = field(init=False)

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64).ravel()
        if not np.isfinite(self.scores).all():
            raise ValueError("bootstrap scores must be finite")
        self.order = np.argsort(self.scores, kind="stable")
        self.ranked = self.scores[self.order]

    @property
    def size(self) -> int:
        return self.scores.size


def _running(counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(rows) + 1, B): out[k] = counts[rows[0]] + ... + counts[rows[k - 1]], per resample.

    One vectorised add per image over the resamples (numpy's own cumsum along the first
    axis is several times slower on a (images, resamples) array)."""
    out = np.empty((len(rows) + 1, counts.shape[1]), dtype=counts.dtype)
    out[0] = 0
    for k, row in enumerate(rows.tolist()):
        np.add(out[k], counts[row], out=out[k + 1])
    return out


def _auroc(ood: _Sorted, id_: _Sorted, ood_cum: np.ndarray, id_counts: np.ndarray) -> np.ndarray:
    """sum_i w_i (2 #OOD below s_i + #OOD tied with s_i) / (2 n m), per resample."""
    below = np.searchsorted(ood.ranked, id_.scores, side="left")
    at_most = np.searchsorted(ood.ranked, id_.scores, side="right")
    exact = np.int64 if 2 * id_.size * ood.size >= 2**31 else np.int32  # the sums below stay exact
    strictly_below = np.einsum("ib,ib->b", id_counts, ood_cum[below], dtype=exact)
    tied = not np.array_equal(below, at_most)  # ties between ID and OOD scores count one half
    at_or_below = np.einsum("ib,ib->b", id_counts, ood_cum[at_most], dtype=exact) if tied else strictly_below
    return (strictly_below + at_or_below) / (2.0 * id_.size * ood.size)


def _classic_threshold(id_: _Sorted, id_counts: np.ndarray, tpr: float) -> np.ndarray:
    """Per resample, the largest ID score with ceil(tpr n) drawn ID images at or above it:
    the ascending position c where fewer than that remain above, i.e. c = #{q: A[q] <= n - kept}
    with A the running count from the lowest score. Only the lowest scores can matter, so A
    is built over a window that grows until it holds the answer for every resample."""
    allowed = id_.size - kept_count(id_.size, tpr)
    window = min(id_.size, 2 * allowed + 8 * int(np.sqrt(id_.size)) + 16)
    while True:
        running = _running(id_counts, id_.order[:window])[1:]
        if window == id_.size or (running[-1] > allowed).all():
            break
        window = min(id_.size, 2 * window)
    return id_.ranked[(running <= allowed).sum(axis=0)]


def _fpr_classic(ood: _Sorted, ood_cum: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    below = np.searchsorted(ood.ranked, threshold, side="left")
    return (ood.size - ood_cum[below, np.arange(threshold.size)]) / ood.size


def _fpr_openood(ood: _Sorted, id_: _Sorted, ood_cum: np.ndarray, id_counts: np.ndarray, tpr: float) -> np.ndarray:
    """The first OOD score value v whose running OOD share reaches `tpr` (compared as the
    metric does, share = count / m in floating point), then the drawn ID share at or below v."""
    needed = max(int(tpr * ood.size) - 2, 0)
    while needed / ood.size < tpr:
        needed += 1
    value = ood.ranked[(ood_cum[1:] < needed).sum(axis=0)]
    upto = np.searchsorted(id_.ranked, value, side="right")
    low, high = int(upto.min()), int(upto.max())
    base = id_counts[id_.order[:low]].sum(axis=0)
    window = _running(id_counts, id_.order[low:high])
    return (base + window[upto - low, np.arange(value.size)]) / id_.size


def bootstrap_replicates(id_scores: Mapping[Hashable, np.ndarray],
                         ood_scores: Mapping[Hashable, Mapping[str, np.ndarray]],
                         resamples: int = RESAMPLES, seed: int = 0, fpr: str = "classic",
                         tpr: float = TPR, id_name: str = "id_test",
                         ) -> dict[Hashable, dict[str, dict[str, np.ndarray]]]:
    """AUROC and FPR@`tpr` on `resamples` paired bootstrap resamples.

    `id_scores`: method key -> its ID test scores; `ood_scores`: method key -> OOD set name
    -> scores (higher = more ID). Methods with the same number of images in a set share
    that set's resamples. Returns key -> set name -> {"auroc": (B,), "fpr": (B,)}.
    """
    if fpr not in FPR_CONVENTIONS:
        raise ValueError(f"fpr must be one of {FPR_CONVENTIONS}, got {fpr!r}")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    ids = {key: _Sorted(scores) for key, scores in id_scores.items()}
    oods = {key: {name: _Sorted(scores) for name, scores in sets.items()} for key, sets in ood_scores.items()}
    streams = {(id_name, s.size) for s in ids.values()}
    streams |= {(name, s.size) for sets in oods.values() for name, s in sets.items()}
    largest = max((size for _, size in streams), default=1)
    batch = max(1, min(resamples, CHUNK_ELEMENTS // largest))
    out = {key: {name: {"auroc": np.empty(resamples), "fpr": np.empty(resamples)} for name in sets}
           for key, sets in oods.items()}
    for start in range(0, resamples, batch):
        replicates = range(start, min(start + batch, resamples))
        counts = {(name, size): resample_counts(size, replicates, seed, stream_of(name, size))
                  for name, size in streams}
        columns = slice(replicates.start, replicates.stop)
        for key, sets in oods.items():
            id_ = ids[key]
            id_counts = counts[(id_name, id_.size)]
            threshold = _classic_threshold(id_, id_counts, tpr) if fpr == "classic" else None
            for name, ood in sets.items():
                ood_cum = _running(counts[(name, ood.size)], ood.order)
                out[key][name]["auroc"][columns] = _auroc(ood, id_, ood_cum, id_counts)
                out[key][name]["fpr"][columns] = (_fpr_classic(ood, ood_cum, threshold) if fpr == "classic"
                                                  else _fpr_openood(ood, id_, ood_cum, id_counts, tpr))
    return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding `level` of the replicates."""
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(replicates, dtype=np.float64), [tail, 1 - tail])
    return float(low), float(high)


def not_significant(best: np.ndarray, other: np.ndarray, higher_is_better: bool, level: float = LEVEL) -> bool:
    """Whether `other` is not significantly worse than `best`: the percentile interval of the
    paired differences (best - other, signed so that positive = best is better) reaches 0."""
    difference = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    if not higher_is_better:
        difference = -difference
    return interval(difference, level)[0] <= 0.0
