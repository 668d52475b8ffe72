"""GRAM, Gram-matrix deviations (Sastry & Oore, "Detecting Out-of-Distribution Examples
with Gram Matrices", ICML 2020).

For every hooked layer call l (by default every ``nn.Conv2d`` and ``nn.ReLU`` call, as
OpenOOD hooks them) and power p, the feature map F (C x S positions) gives the vector
G_lp(x)_c = sign(g_c) |g_c|^(1/p), g_c = sum_d sum_s F_cs^p F_ds^p (the row sums of the
p-th order Gram matrix; `oodbench.models.layers`, reduction ``gram``). Fit, per class c
on the ID fit split: the element-wise minimum m and maximum M of G_lp over its samples
(a seeded 90%), and per layer the normaliser n_l = the mean, over the held-out 10% of
every class, of sum_p delta(G_lp) against its own class. With
delta(v) = sum_j [relu(m_j - v_j) / |m_j + 1e-6| + relu(v_j - M_j) / |M_j + 1e-6|],

    score(x) = - [sum_l sum_p delta_{y}(G_lp(x)) / n_l] / max softmax(f(x)),   y = argmax f(x)

(higher = more in-distribution). The statistics are extracted once per (model, split)
and cached (``layer_statistics``); nothing runs the model at scoring time.

Differences from OpenOOD's ``gram_postprocessor.py``: its 90/10 split is unseeded
(``random.sample``), here a seeded permutation per class; the Gram row sums are
computed as F^p (F^p)' 1 in float64, not via the full C x C matrix in float32 (equal up
to rounding); a class absent from the fit split contributes no deviation (OpenOOD fails
on it), and a layer whose held-out deviations are all zero (or that has no held-out
samples: fewer than 10 per class) is normalised by 1 instead of dividing by zero.

Measured on ../shared's CIFAR-10 ResNet-56 (fit on 300 ID validation JPEGs; 300 ID test vs
300 TIN): OpenOOD's own code run on the same images and held-out split gives the same
scores to a median relative difference of 1e-6 (at most 1.5e-3, its float32 Gram sums) and
the same AUROC (79.60).
"""

from __future__ import annotations

import torch

from oodbench.models.layers import LayerStatistic, statistic
from oodbench.postprocessors.base import Either, Integer, ListOf, OneOf, Outputs, Postprocessor, Text
from oodbench.registry import register_postprocessor

MIN_MAX_EPS = 1e-6
HOLDOUT = 0.1


def deviation(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """delta per row: normalised amounts below `low` and above `high` (N x K against N x K bounds)."""
    below = torch.relu(low - values) / (low + MIN_MAX_EPS).abs()
    above = torch.relu(values - high) / (high + MIN_MAX_EPS).abs()
    return torch.nan_to_num(below, nan=0.0).sum(dim=1) + torch.nan_to_num(above, nan=0.0).sum(dim=1)


def holdout_split(labels: torch.Tensor, share: float = HOLDOUT, seed: int = 0) -> torch.Tensor:
    """A boolean mask of the held-out rows: int(share * n_c) seeded rows of each class."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        rows = torch.nonzero(labels == c).flatten()
        held[rows[torch.randperm(len(rows), generator=generator)[: int(share * len(rows))]]] = True
    return held


@register_postprocessor("gram")
class GRAM(Postprocessor):
    family = "feature"
    needs_fit = True
    needs_layers = True
    defaults = {"powers": [1, 2, 3, 4, 5], "layers": "conv_relu"}
    ranges = {"powers": ListOf(Integer(ge=1, le=10)), "layers": Either(OneOf("conv_relu", "stages"), ListOf(Text()))}

    def layer_statistics(self) -> tuple[LayerStatistic, ...]:
        layers = self.params["layers"]
        return (LayerStatistic("gram", layers if isinstance(layers, str) else tuple(layers),
                               tuple(int(p) for p in self.params["powers"])),)

    def _per_power(self, outputs: Outputs) -> list[torch.Tensor]:
        """Per layer call: P x N x C (the statistic split by power), float64."""
        powers = len(self.params["powers"])
        return [v.double().reshape(len(v), powers, -1).transpose(0, 1)
                for v in statistic(outputs, self.layer_statistics()[0], self.name)]

    def fit(self, train: Outputs, val: Outputs) -> None:
        labels = train.labels
        held = holdout_split(labels)
        classes = train.logits.shape[1]
        self.low, self.high, factors = [], [], []
        for values in self._per_power(train):
            low = torch.full((classes, *values.shape[::2]), float("-inf"), dtype=torch.float64)
            high = torch.full_like(low, float("inf"))
            for c in labels.unique().tolist():
                kept = values[:, (labels == c) & ~held]
                if kept.shape[1]:
                    low[c], high[c] = kept.min(dim=1).values, kept.max(dim=1).values
            self.low.append(low)
            self.high.append(high)
            held_dev = self._layer_deviation(values[:, held], labels[held], low, high)
            factor = float(held_dev.mean()) if len(held_dev) else 0.0
            factors.append(factor if factor > 0 else 1.0)
        self.factors = torch.tensor(factors, dtype=torch.float64)

    @staticmethod
    def _layer_deviation(values: torch.Tensor, classes: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                         ) -> torch.Tensor:
        """sum over powers of delta against each row's class bounds (values P x N x C, bounds K x P x C)."""
        return sum(deviation(values[p], low[classes, p], high[classes, p]) for p in range(values.shape[0]))

    def score(self, outputs: Outputs) -> torch.Tensor:
        probabilities = torch.softmax(outputs.logits.double(), dim=1)
        confidence, predicted = probabilities.max(dim=1)
        total = torch.zeros(len(outputs), dtype=torch.float64)
        for values, low, high, factor in zip(self._per_power(outputs), self.low, self.high, self.factors):
            total += self._layer_deviation(values, predicted, low, high) / factor
        return (-total / confidence).float()
