"""WeiPer: OOD detection with weight perturbations of the class projections (Granz et al.,
NeurIPS 2024, arXiv:2405.17164; reference code github.com/mgranz/weiper, its OpenOOD
``weiper_kldiv`` postprocessor).

With z the penultimate features (D), (W: C x D, b) the classifier and r repeats: each
repeat i draws a C x D Gaussian matrix, scales every row to length delta ||W_c|| (delta =
``perturbation_distance``) and adds it to W; stacking the r perturbed classifiers gives
W~ (rC x D) and the perturbed logits z~ = W~ z + [b; ...; b] (rC values per sample).

- ``weiper``: the mean over the r perturbed classifiers of their maximum softmax
  probability, MSP~(z) = (1/r) sum_i max softmax(z~_i) (the paper's WeiPer+MSP).
- ``weiper_kld`` (WeiPer+KLD): each sample's values are histogrammed. For the D features
  of a sample, q is the share of them in each of n_bins equal bins between the minimum
  and maximum of every train feature (values outside count in the total only); likewise
  q~ for its rC perturbed logits, between the train perturbed logits' extremes. The train
  densities p, p~ are the means of q, q~ over the train samples. Then q is smoothed by a
  moving average of s_1 bins (s_2 for q~; replicate padding, window centred as PyTorch's
  ``padding="same"``), eps (0.01, and 0.025 for the perturbed side) is added to p and q,
  both are normalised to sum 1, and with the symmetric Kullback-Leibler divergence
  KL_s(p, q) = KL(p || q) + KL(q || p):

      score = -(KL_s(p, q) + lambda_1 KL_s(p~, q~) - lambda_2 MSP~(z)).

The random directions come from a torch generator seeded with ``seed`` and are drawn in
the reference's order (one C x D draw per repeat), so a seed gives the reference's W~
under ``torch.manual_seed(seed)``. The reference averages train densities batch by batch;
oodbench takes the exact mean. Defaults are the authors' CIFAR-10 ResNet-18 setting and
the search lists their ``weiper_kldiv.yml`` sweep (3,600 combinations: histograms are
computed once per (delta, n_bins) and every smoothing and lambda scored from them; the
fit split's histograms serve the validation scores when they are the same split, and
MSP~ is computed once per delta; bins are counted by `edge_counts`, not a binary search).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.identity import tensors_checksum
from oodbench.postprocessors.base import Integer, InvalidHyperparameter, Number, Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor

BLOCK_ELEMENTS = 1 << 22  # rows x perturbed logits held at once
EPS_FEATURES, EPS_PERTURBED = 0.01, 0.025  # the reference's epsilon and epsilon_noise


def perturbed_classifier(weight: torch.Tensor, repeats: int, distance: float, seed: int) -> torch.Tensor:
    """W~ (r C x D): r copies of W, each row c plus a random direction of length distance ||W_c||."""
    generator = torch.Generator().manual_seed(seed)
    weight = weight.float()
    norms = weight.norm(dim=1, keepdim=True)
    draws = [F.normalize(torch.randn(weight.shape, generator=generator), dim=1) for _ in range(repeats)]
    return torch.cat([weight + distance * draw * norms for draw in draws])


def bin_edges(low: float, high: float, bins: int) -> torch.Tensor:
    """The reference's float32 edges: low + k / bins * (high + 1e-8 - low), k = 0..bins."""
    low, high = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    return low + torch.arange(bins + 1, dtype=torch.float32) / bins * (high + 1e-8 - low)


def edge_counts(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """How many of the equally spaced float32 `edges` are <= each float32 value (NaN: all
    of them): ``torch.bucketize(values, edges, right=True)`` exactly, about 5x faster.

    The count is estimated from the value's position between the extremes, then stepped
    until edges[c - 1] <= v < edges[c] holds against the edges themselves, so rounding in
    the estimate never shows. (torch's binary search costs ~7 data-dependent comparisons
    per value: the dominant cost of WeiPer+KLD's search; numpy's elementwise steps here
    are cheaper than torch's for bool-to-integer arithmetic.)"""
    bins = len(edges) - 1
    width = float(edges[-1] - edges[0])
    if values.device.type != "cpu" or not (width > 0 and torch.isfinite(edges).all()):
        return torch.bucketize(values, edges, right=True)
    v, e = values.numpy(), edges.numpy()
    guess = (v - e[0]) * np.float32(bins / width)
    np.fmin(guess, bins, out=guess)  # NaN -> bins: above every edge
    count = np.maximum(guess, -1, out=guess).astype(np.int64)  # an estimate: truncation is fine
    count += 1
    # below.take(c) is edges[c - 1], above.take(c) is edges[c]; the NaN ends compare false,
    # so c stays in 0..bins + 1
    below = np.concatenate([[np.nan], e, [np.nan]]).astype(np.float32)
    above = below[1:]
    while (up := above.take(count) <= v).any():
        count += up
    while (down := below.take(count) > v).any():
        count -= down
    return torch.from_numpy(count)


def value_histograms(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """N x bins: the share of each row's values in each bin [e_k, e_(k+1)) (outside values: the total only)."""
    index = edge_counts(values.float().contiguous(), edges)  # 0: below, bins + 1: above
    counts = torch.zeros(values.shape[0], len(edges) + 1, dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones(1, 1, dtype=torch.float64).expand(index.shape))  # no N x D ones
    return counts[:, 1:-1] / values.shape[1]


def smoothed(densities: torch.Tensor, window: int) -> torch.Tensor:
    """Moving average of `window` bins along each row, replicate-padded, centred as padding="same"."""
    left = (window - 1) // 2
    padded = F.pad(densities[:, None], (left, window - 1 - left), mode="replicate")
    return F.avg_pool1d(padded, window, stride=1)[:, 0]


def symmetric_kl(train: torch.Tensor, densities: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """KL(p || q) + KL(q || p) per row of `densities` against the train density p, q smoothed."""
    p = train + eps
    q = smoothed(densities, window) + eps
    p, q = p / p.sum(), q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


def mean_msp(logits: torch.Tensor, classes: int) -> torch.Tensor:
    """Mean over the r blocks of C perturbed logits of each block's maximum softmax probability."""
    blocks = logits.double().reshape(logits.shape[0], -1, classes)
    return torch.softmax(blocks, dim=2).max(dim=2).values.mean(dim=1)


class PerturbedProjections:
    """W~ and the perturbed logits of a set of outputs, in row blocks."""

    # remembered beside the fit, never part of the fit state
    transient = ("_val_histograms", "_perturbed_digest")

    def perturb(self, train: Outputs) -> None:
        p = self.params
        self.perturbed_weight = perturbed_classifier(train.fc[0], p["n_repeats"], p["perturbation_distance"], p["seed"])
        self.perturbed_bias = train.fc[1].float().repeat(p["n_repeats"])
        self._perturbed_digest = None

    def fit_state(self) -> dict[str, Any]:
        return {key: value for key, value in super().fit_state().items() if key not in self.transient}

    def load_fit_state(self, state: dict[str, Any]) -> None:
        super().load_fit_state(state)
        self._perturbed_digest = None

    def rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // self.perturbed_weight.shape[0])

    def perturbed_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.perturbed_weight.T + self.perturbed_bias

    def perturbed_msp(self, outputs: Outputs) -> torch.Tensor:
        """MSP~ of every sample (N), remembered (`remembered`) for the latest (features, W~ and
        b~), all known by the checksum of their bytes: a search fits one instance per (delta,
        n_bins), those of one delta draw the same W~, and WeiPer and WeiPer+KLD draw the same
        W~ for a delta, so each (split, delta) is computed once in a process. Hashing costs
        about 1/1000 of the product it saves; the memory holds neither features nor W~."""
        if getattr(self, "_perturbed_digest", None) is None:
            self._perturbed_digest = tensors_checksum({"weight": self.perturbed_weight, "bias": self.perturbed_bias})
        classes = outputs.fc[0].shape[0]
        return remembered(("msp", content_digest(outputs.features), self._perturbed_digest, classes),
                          lambda: in_blocks(lambda z: mean_msp(self.perturbed_logits(z), classes), outputs.features,
                                            rows=self.rows()))


def remembered(key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The per-sample values (N) remembered for `key`, a tuple of checksums and settings that
    determines them, else `compute()`'s, remembered; the latest `MEMO_SIZE` are kept."""
    for known, values in _MEMO:
        if known == key:
            return values
    values = compute()
    _MEMO.insert(0, (key, values))
    del _MEMO[MEMO_SIZE:]
    return values


def content_digest(tensor: torch.Tensor) -> str:
    """`tensors_checksum` of one tensor, remembered while it lives unchanged (same object,
    same in-place version counter): a search asks for its validation features' again and again."""
    for ref, version, digest in _DIGESTS:
        if ref() is tensor and version == tensor._version:
            return digest
    digest = tensors_checksum({"tensor": tensor})
    _DIGESTS[:] = [(weakref.ref(tensor), tensor._version, digest),
                   *[entry for entry in _DIGESTS if entry[0]() is not None]][:16]
    return digest


# (key, per-sample values) of the latest MSP~ and feature divergences, newest first (a
# search over WeiPer+KLD's sweep makes 8 MSP~ and 30 divergences of its validation sets), and
# the latest features' checksums (held weakly): exact reuse, nothing else kept alive
_MEMO: list[tuple[tuple, torch.Tensor]] = []
_DIGESTS: list[tuple[weakref.ref, int, str]] = []
MEMO_SIZE = 64


WEIPER_DEFAULTS = {"n_repeats": 100, "perturbation_distance": 1.8, "seed": 0}
WEIPER_RANGES = {"n_repeats": Integer(ge=1), "perturbation_distance": Number(gt=0), "seed": Integer(ge=0)}


@register_postprocessor("weiper")
class WeiPer(PerturbedProjections, Postprocessor):
    family = "logit"
    needs_features = True
    needs_fit = True
    defaults = dict(WEIPER_DEFAULTS)
    ranges = dict(WEIPER_RANGES)

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.perturb(train)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.perturbed_msp(outputs).clone()  # the remembered MSP~ stays as computed, whatever a caller does


@register_postprocessor("weiper_kld")
class WeiPerKLD(PerturbedProjections, Postprocessor):
    family = "logit"
    needs_features = True
    needs_fit = True
    defaults = {**WEIPER_DEFAULTS, "n_bins": 100, "smoothing": 4, "smoothing_perturbed": 15, "lambda_1": 2.5,
                "lambda_2": 0.1}
    ranges = {**WEIPER_RANGES, "n_bins": Integer(ge=1), "smoothing": Integer(ge=1),
              "smoothing_perturbed": Integer(ge=1), "lambda_1": Number(ge=0), "lambda_2": Number(ge=0)}
    fit_params = ("n_repeats", "perturbation_distance", "seed", "n_bins")
    grid_params = ("smoothing", "smoothing_perturbed", "lambda_1", "lambda_2")

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.perturb(train)
        self._val_histograms = None
        features = train.features.float()
        self.feature_range = (float(features.min()), float(features.max()))
        extremes = in_blocks(lambda z: torch.stack(self.perturbed_logits(z).aminmax(dim=1), dim=1), features,
                             rows=self.rows())
        self.perturbed_range = (float(extremes[:, 0].min()), float(extremes[:, 1].max()))
        if val is not None and val.features is not None and val.features.shape == train.features.shape \
                and torch.equal(val.features, train.features):
            # fit on the validation split (fit_split: val): the search scores these same
            # histograms next; kept for it, outside the fit state
            densities, perturbed = self.feature_densities(train), self.perturbed_densities(train)
            self.train_density, self.train_density_perturbed = densities.mean(dim=0), perturbed.mean(dim=0)
            self._val_histograms = (val.features, densities, perturbed)
            return
        # the train densities from per-block sums: memory holds a block of histograms, not the
        # split's (1.6 GB at ImageNet-1K); of one block, bit for bit the mean of the whole
        sums = in_blocks(lambda z: torch.cat([self.feature_histograms(z).sum(dim=0, keepdim=True),
                                              self.perturbed_histograms(z).sum(dim=0, keepdim=True)], dim=1),
                         features, rows=self.rows())
        density = sums.sum(dim=0) / len(features)
        bins = self.params["n_bins"]
        self.train_density, self.train_density_perturbed = density[:bins], density[bins:]

    def feature_histograms(self, features: torch.Tensor) -> torch.Tensor:
        return value_histograms(features, bin_edges(*self.feature_range, self.params["n_bins"]))

    def perturbed_histograms(self, features: torch.Tensor) -> torch.Tensor:
        return value_histograms(self.perturbed_logits(features), bin_edges(*self.perturbed_range, self.params["n_bins"]))

    def feature_densities(self, outputs: Outputs) -> torch.Tensor:
        """N x n_bins histograms of the features."""
        kept = getattr(self, "_val_histograms", None)
        if kept is not None and outputs.features is kept[0]:
            return kept[1]
        return in_blocks(self.feature_histograms, outputs.features, rows=self.rows())

    def perturbed_densities(self, outputs: Outputs) -> torch.Tensor:
        """N x n_bins histograms of the perturbed logits."""
        kept = getattr(self, "_val_histograms", None)
        if kept is not None and outputs.features is kept[0]:
            return kept[2]
        return in_blocks(self.perturbed_histograms, outputs.features, rows=self.rows())

    def score(self, outputs: Outputs) -> torch.Tensor:
        score = self.score_grid(outputs, [{}])[0]
        if isinstance(score, InvalidHyperparameter):
            raise score
        return score

    def score_grid(self, outputs: Outputs, combos: list[dict[str, Any]]) -> list[torch.Tensor]:
        """One pass of histograms for every smoothing and lambda; each divergence once per
        window. The features' divergences do not depend on delta: remembered by the checksums
        of the features and of their train density, a search's later deltas reuse them."""
        settings = [{**self.params, **combo} for combo in combos]
        densities = functools.cache(lambda: self.feature_densities(outputs))
        known = (content_digest(outputs.features), self.feature_range, self.params["n_bins"],
                 tensors_checksum({"density": self.train_density}))
        feature_kl = {s: remembered(("feature_kl", *known, s),
                                    lambda s=s: symmetric_kl(self.train_density, densities(), s, EPS_FEATURES))
                      for s in {setting["smoothing"] for setting in settings}}
        perturbed = self.perturbed_densities(outputs)
        perturbed_kl = {s: symmetric_kl(self.train_density_perturbed, perturbed, s, EPS_PERTURBED)
                        for s in {setting["smoothing_perturbed"] for setting in settings}}
        msp = self.perturbed_msp(outputs)
        scores: list[torch.Tensor] = []
        rows = max(1, BLOCK_ELEMENTS // max(len(msp), 1))  # combinations scored at once, as B x N
        for first in range(0, len(settings), rows):
            block = settings[first:first + rows]
            # the same elementwise operations as one combination at a time, on B rows at once
            lambdas = torch.tensor([[s["lambda_1"], s["lambda_2"]] for s in block], dtype=torch.float64)
            features = torch.stack([feature_kl[s["smoothing"]] for s in block])
            perturbed = torch.stack([perturbed_kl[s["smoothing_perturbed"]] for s in block])
            scores += (-(features + lambdas[:, :1] * perturbed - lambdas[:, 1:] * msp)).unbind(0)
        return scores
