"""Neighbour scores against a bank of ID fit features: NNGuide, Relation, CFOOD.

z = penultimate features, u = z / ||z|| (unit features), f = logits, p = softmax(f),
e = logsumexp(f) (energy). Banks hold fit-split (train) samples, in the split's order.

- NNGuide, nearest-neighbour guidance (Park et al., ICCV 2023, arXiv:2309.14888): the
  bank is the first B fit samples, each guide g_j = e_j u_j; with the test sample's K
  largest inner products u . g_j, score = e * mean(top-K of u . g_j). B = ceil(alpha N)
  (``bank_batch: null``, the paper's alpha N), or, with ``bank_batch: b``, OpenOOD v1.5's
  rule: its setup adds whole loader batches of b train samples, in the image list's order
  (the evaluator's loader, batch_size 200, shuffle False), and stops after the first batch
  that brings the count above int(alpha N): B = min(N, b (int(alpha N) // b + 1)) (600 of
  CIFAR-10's 50,000 at b = 200 and alpha = 0.01, against 500). The bank holds at least K
  samples (max(B, K), at most N), so that small fit splits work; OpenOOD would average
  faiss's empty slots. K above N is an `InvalidHyperparameter`. OpenOOD also adds 1e-10
  to every normalised coordinate (a change of ~1e-9 relative) and searches with faiss's
  exact inner-product index, like this one.
- Relation, neural relation graph (Kim et al., NeurIPS 2023, arXiv:2301.12321): every
  fit sample j is joined to the test sample by r_j = max(0, u . u_j) * (p . p_j);
  score = sum_j [r_j > 0.03] r_j^pow (the edges are non-negative, so OpenOOD's
  sign(r) |r|^pow is r^pow). Unit features are z / sqrt(||z||^2 + 1e-10), as there.
  A search computes the edges once for every pow.
- CFOOD (contributed to OpenOOD v1.5 in Nov 2025; its code cites no paper): a reference
  set R of n = int(alpha N) unit features (all N when alpha = 1), z / (||z|| + 1e-10);
  for each reference j, d_j(kappa) = squared distance to its (kappa n)-th nearest
  reference, for kappa on a fixed grid of 230 fractions (0.001..0.99; positions
  int(kappa n - 1) + 1 of the sorted distances, repeated positions dropped). A test
  feature v with squared distances s_j to the references gets
  kappa*(v) = the smallest grid kappa with mean_j [d_j(kappa) >= s_j] >= k (1 when
  none), and score = -kappa*(v). OpenOOD draws the subset with an unseeded
  torch.randperm and keeps it for every alpha of its search (its setup runs once);
  here the subset is seeded (generator seed 0) and refitted per alpha.

Everything is computed in float64 over blocks of test rows, so memory stays bounded by
one block against the bank. CFOOD keeps its references as row numbers of the memory-mapped
fit split (``fit_views``) and normalises them a block at a time as it compares them; what it
stores is the n x 230 float64 sorted distances (184 bytes per fit image at alpha = 0.1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oodbench.postprocessors.base import (Either, Integer, InvalidHyperparameter, Number, OneOf, Outputs,
                                          Postprocessor, in_blocks)
from oodbench.postprocessors.distance import BANK_BLOCK_ELEMENTS
from oodbench.registry import register_postprocessor

RELATION_THRESHOLD = 0.03  # edges at or below it are dropped (the reference code's `thres`)
RELATION_BANK_ROWS = 1 << 14  # fit rows searched at once (bank blocks summed: scores to float64 rounding)
CFOOD_SEED = 0
CFOOD_REFERENCE_ROWS = 1 << 12  # references read, normalised and compared at once (64 MiB of 2048-d float64)
CFOOD_BISECT_PASSES = 40  # bisect for kappa* (`first_reaching`) when the k x log2(grid) passes are at most this
# (a search's 4 k at CFOOD's 230-column grid: 32 passes, ~2/3 of the cost of the counts path)
CFOOD_BISECT_ROWS = 256  # test rows bisected at once (their distances stay in cache)


def bank_rows(bank_size: int) -> int:
    """Test rows per block so that one block against the bank stays within BANK_BLOCK_ELEMENTS."""
    return max(1, BANK_BLOCK_ELEMENTS // max(bank_size, 1))


def energy(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.double(), dim=1)


def nnguide_bank_size(samples: int, alpha: float, batch: int | None) -> int:
    """Fit samples in NNGuide's bank before its K floor: ceil(alpha N), or with `batch` OpenOOD's
    whole batches until more than int(alpha N) are in (at most N)."""
    if batch is None:
        return math.ceil(alpha * samples)
    return min(samples, batch * (int(alpha * samples) // batch + 1))


@register_postprocessor("nnguide")
class NNGuide(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True
    defaults = {"k": 100, "alpha": 0.01, "bank_batch": None}
    # k at most the fit samples, checked on the data
    ranges = {"k": Integer(ge=1), "alpha": Number(gt=0, le=1), "bank_batch": Either(OneOf(None), Integer(ge=1))}
    fit_params = ("alpha", "k", "bank_batch")

    def fit(self, train: Outputs, val: Outputs) -> None:
        size = max(nnguide_bank_size(len(train), self.params["alpha"], self.params["bank_batch"]), self.params["k"])
        unit = torch.nn.functional.normalize(train.features[:size].double(), dim=1)
        self.guides = unit * energy(train.logits[:size])[:, None]

    def score(self, outputs: Outputs) -> torch.Tensor:
        k = self.params["k"]
        if k > len(self.guides):
            raise InvalidHyperparameter(f"nnguide: k={k} must be at most the {len(self.guides)} fit samples")

        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            unit = torch.nn.functional.normalize(z.double(), dim=1)
            guidance = (unit @ self.guides.T).topk(k, dim=1).values.mean(dim=1)
            return guidance * energy(logits)

        return in_blocks(block, outputs.features, outputs.logits, rows=bank_rows(len(self.guides))).float()


def relation_unit(features: torch.Tensor) -> torch.Tensor:
    z = features.double()
    return z / (z.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()


@register_postprocessor("relation")
class Relation(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True
    defaults = {"pow": 1}
    ranges = {"pow": Number(gt=0)}
    fit_params = ()
    grid_params = ("pow",)
    cache_fit = False  # its fit state is the fit split's outputs, already in the output cache

    def fit(self, train: Outputs, val: Outputs) -> None:
        # kept as they are (memory-mapped); each bank block's units and probabilities are
        # computed as it is searched, so no float64 copy of the fit split exists
        self.bank_features, self.bank_logits = train.features, train.logits

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.score_grid(outputs, [{}])[0]

    def score_grid(self, outputs: Outputs, combos: list[dict]) -> list[torch.Tensor]:
        powers = [{**self.params, **combo}["pow"] for combo in combos]

        size = len(self.bank_features)
        step = min(size, RELATION_BANK_ROWS)

        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            units, probs, total = relation_unit(z), torch.softmax(logits.double(), dim=1), 0
            for start in range(0, size, step):  # one block when the bank is small: the sums as before
                # in place, one B x bank matrix: max(0, u . u_j) (p . p_j) kept where above the
                # threshold is u . u_j (p . p_j) kept there (p . p_j >= 0 and the threshold > 0:
                # a negative similarity is dropped either way); NaN edges are dropped as well
                edges = units @ relation_unit(self.bank_features[start : start + step]).T
                edges.mul_(probs @ torch.softmax(self.bank_logits[start : start + step].double(), dim=1).T)
                edges.masked_fill_(~(edges > RELATION_THRESHOLD), 0)
                power_of = torch.empty_like(edges) if any(power != 1 for power in powers) else None
                total = total + torch.stack([(edges if power == 1 else torch.pow(edges, power, out=power_of)).sum(dim=1)
                                             for power in powers], dim=1)
            return total

        scores = in_blocks(block, outputs.features, outputs.logits, rows=bank_rows(step))
        return [scores[:, i].float() for i in range(len(powers))]


def cfood_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kappa fractions and the sorted-distance positions they read (repeats dropped)."""
    kappa = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    position = (kappa * n - 1).astype(int)
    keep = np.concatenate(([True], position[:-1] < position[1:]))
    return torch.from_numpy(kappa[keep]), torch.from_numpy(position[keep] + 1)


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, squared: torch.Tensor | None = None) -> torch.Tensor:
    """||q||^2 - 2 q . b + ||b||^2, at least 0, computed in place in the one queries x bank
    matrix (no temporaries of its size); `squared`: the queries' ||q||^2 (N x 1) when known."""
    distances = 2 * queries @ bank.T
    squared = (queries * queries).sum(1, keepdim=True) if squared is None else squared
    torch.sub(squared, distances, out=distances)
    return distances.add_((bank * bank).sum(1)).clamp_min_(0)


def first_reaching(distances: torch.Tensor, columns: torch.Tensor, needs: list[float]) -> torch.Tensor:
    """B x len(needs): for each test row (its squared distances s_j to the references, B x n)
    and each need, the first grid column g with #{j : d_j(g) >= s_j} >= need, or the grid
    size when none (`columns`: the references' sorted distances d, grid x n, no NaN).

    That count is the number of references whose searchsorted position of s_j is at most g
    (d_j is sorted), the cumulative count CFOOD's scores read, and it does not decrease
    with g: a bisection over g finds the same column, in log2(grid) passes of B x n
    comparisons per need (~1 ns a pair each, in cache), instead of one binary search per
    (row, reference) pair (~50 ns, branchy); for NaN distances searchsorted's order is the
    rule, not this."""
    grid_size, found = len(columns), []
    bounds = torch.empty_like(distances)  # each row's probed column of d, and whether s_j <= it:
    within = torch.empty(distances.shape, dtype=torch.bool)  # written in place each pass
    for needed in needs:
        least = math.ceil(needed)  # a whole count reaches `needed` iff it reaches this (no float rounding)
        low = torch.zeros(len(distances), dtype=torch.long)  # the column sought is in [low, high]
        high = torch.full((len(distances),), grid_size, dtype=torch.long)
        for _ in range(grid_size.bit_length()):
            middle = (low + high) // 2
            torch.index_select(columns, 0, middle.clamp(max=grid_size - 1), out=bounds)
            np.less_equal(distances.numpy(), bounds.numpy(), out=within.numpy())  # SIMD; torch.le: ~3x slower
            reached = within.view(torch.uint8).sum(dim=1, dtype=torch.int32) >= least
            high = torch.where(reached, middle, high)
            low = torch.where(reached, low, torch.minimum(middle + 1, high))
        found.append(low)
    return torch.stack(found, dim=1)


def cfood_unit(features: torch.Tensor) -> torch.Tensor:
    z = features.double()
    return z / (z.norm(dim=1, keepdim=True) + 1e-10)


@register_postprocessor("cfood")
class CFOOD(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True
    defaults = {"alpha": 0.1, "k": 0.01}
    ranges = {"alpha": Number(gt=0, le=1), "k": Number(gt=0, le=1)}
    fit_params = ("alpha",)
    fit_views = {"bank_features": "features"}
    grid_params = ("k",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        total = len(train.features)
        n = int(self.params["alpha"] * total) if self.params["alpha"] < 1 else total
        if n < 2:
            raise InvalidHyperparameter(f"cfood: alpha={self.params['alpha']} keeps {n} of the {total} fit "
                                        "samples; it needs at least 2")
        self.bank_features = train.features  # the mapped fit split: references are normalised as they are read
        self.reference_rows = torch.arange(total)
        if n < total:  # the sampled rows in the split's order: a score counts the references as a set,
            generator = torch.Generator().manual_seed(CFOOD_SEED)  # and the mapped rows are read in order
            self.reference_rows = torch.randperm(total, generator=generator)[:n].sort().values
        self.kappa, positions = cfood_grid(n)

        def sorted_distances(rows: torch.Tensor) -> torch.Tensor:
            distances = torch.empty(len(rows), n, dtype=torch.float64)
            queries = cfood_unit(self.bank_features[rows])
            for part, references in self.reference_blocks():
                distances[:, part] = squared_distances(queries, references)
            return torch.from_numpy(np.sort(distances.numpy(), axis=1))[:, positions]  # numpy's sort: ~4x torch's

        self.neighbour_distances = in_blocks(sorted_distances, self.reference_rows, rows=bank_rows(n))

    def reference_blocks(self):
        """(their slice of the references, their unit features), CFOOD_REFERENCE_ROWS references
        at a time, from the mapped fit split: no float64 copy of the references is kept."""
        for start in range(0, len(self.reference_rows), CFOOD_REFERENCE_ROWS):
            rows = self.reference_rows[start : start + CFOOD_REFERENCE_ROWS]
            yield slice(start, start + len(rows)), cfood_unit(self.bank_features[rows])

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.score_grid(outputs, [{}])[0]

    def score_grid(self, outputs: Outputs, combos: list[dict]) -> list[torch.Tensor]:
        """Every k from one pass: the counts of references reached by each kappa do not depend on k.
        For a few k (a search's) and one block of references, each k's kappa* by bisection
        instead (`first_reaching`), the same columns."""
        n, grid_size = self.neighbour_distances.shape
        needs = [{**self.params, **combo}["k"] * n for combo in combos]
        bisect = (n <= CFOOD_REFERENCE_ROWS and len(needs) * grid_size.bit_length() <= CFOOD_BISECT_PASSES
                  and not bool(self.neighbour_distances.isnan().any()))
        columns = self.neighbour_distances.T.contiguous() if bisect else None  # grid x references

        def kappa_of(first: torch.Tensor) -> torch.Tensor:
            return -torch.where(first < grid_size, self.kappa[first.clamp(max=grid_size - 1)], 1.0)

        def block(z: torch.Tensor) -> torch.Tensor:
            if bisect:
                distances = squared_distances(cfood_unit(z), next(self.reference_blocks())[1])
                if not bool(distances.isnan().any()):
                    first = torch.cat([first_reaching(rows, columns, needs)
                                       for rows in distances.split(CFOOD_BISECT_ROWS)])
                    return torch.stack([kappa_of(column) for column in first.T], dim=1)
            unit, counts = cfood_unit(z), torch.zeros(len(z), grid_size + 1, dtype=torch.float64)
            one = torch.ones(1, dtype=torch.float64)
            for part, references in self.reference_blocks():
                # reference j counts v in at every kappa from the first with d_j(kappa) >= s_j on
                # (the B x references distances, transposed: one copy alive at a time)
                first = torch.searchsorted(self.neighbour_distances[part],
                                           squared_distances(unit, references).T.contiguous())
                counts.scatter_add_(1, first.T, one.expand(first.T.shape))
                del first, references  # before the next block is made: one block alive at a time
            within = counts[:, :grid_size].cumsum(dim=1)
            kappas = []
            for needed in needs:
                reached = within >= needed
                kappas.append(kappa_of(torch.where(reached.any(dim=1), reached.int().argmax(dim=1), grid_size)))
            return torch.stack(kappas, dim=1)

        scores = in_blocks(block, outputs.features, rows=bank_rows(CFOOD_REFERENCE_ROWS))
        return [scores[:, i].float() for i in range(len(combos))]
