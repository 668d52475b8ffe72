"""Activation and weight shaping: reshape the penultimate features z (or the classifier
weights W), recompute the logits W z' + b, and score the energy logsumexp(W z' + b).

- ReAct (Sun et al., NeurIPS 2021): z' = min(z, t), t the p-th percentile of all train
  activations.
- ASH (Djurisic et al., ICLR 2023), k = D - round(D p / 100) activations kept per sample:
  ASH-B (default) sets the k largest to sum(z) / k and the rest to zero; ASH-P keeps the
  k largest and zeroes the rest; ASH-S keeps the k largest, zeroes the rest and
  multiplies by exp(sum(z) / sum(top-k of z)).
- SCALE (Xu et al., ICLR 2024): z' = z * exp(sum(z) / sum(top-k of z)), nothing pruned.
- DICE (Sun & Li, ECCV 2022): contributions V = W * mean train z (per class, per unit);
  the weights whose contribution is at or below the p-th percentile of V are zeroed.
- VRA (Xu et al., NeurIPS 2023), as OpenOOD v1.5 implements it: z' = min(max(z, t_lo), t_hi),
  t_lo and t_hi the low and high percentiles of all train activations. OpenOOD takes them
  on ID validation activations (as for ReAct); the authors' code sets activations below
  a per-unit quantile to zero instead of raising them, and clips at per-unit quantiles.

A ratio sum(z) / sum(top-k) with a zero denominator (an all-zero feature) is taken as 0,
so such a sample keeps z' = z. Percentiles are NumPy's linear interpolation.
"""

from __future__ import annotations

from typing import Callable

import torch

from oodbench.postprocessors.base import InvalidHyperparameter, Number, OneOf, Outputs, Postprocessor, in_blocks
from oodbench.postprocessors.streaming import column_mean, percentile, percentiles
from oodbench.registry import register_postprocessor

# p = 100 would prune every activation (ASH, SCALE) or mask every weight (DICE)
PRUNING_PERCENTILE = Number(ge=0, lt=100)


def kept_count(dim: int, p: float, method: str) -> int:
    """k = D - round(D p / 100): how many of the D activations survive pruning."""
    k = dim - round(dim * p / 100)
    if not 1 <= k <= dim:
        raise InvalidHyperparameter(f"{method}: percentile={p} keeps {k} of {dim} activations; it must keep 1 to {dim}")
    return k


def safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1), 0)


def shaped_energy(outputs: Outputs, shape: Callable[[torch.Tensor], torch.Tensor],
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """logsumexp(W shape(z) + b) over row blocks, in float64."""
    fc_weight, bias = outputs.fc
    weight = (fc_weight if weight is None else weight).double()
    bias = bias.double()
    return in_blocks(lambda z: torch.logsumexp(shape(z.double()) @ weight.T + bias, dim=1), outputs.features).float()


def ash(z: torch.Tensor, k: int, variant: str) -> torch.Tensor:
    values, index = z.topk(k, dim=1)
    total = z.sum(dim=1, keepdim=True)
    if variant == "b":
        kept = (total / k).expand_as(values)
    elif variant == "p":
        kept = values
    else:
        kept = values * safe_ratio(total, values.sum(dim=1, keepdim=True)).exp()
    return torch.zeros_like(z).scatter(1, index, kept)


def scale(z: torch.Tensor, k: int) -> torch.Tensor:
    top_sum = z.topk(k, dim=1).values.sum(dim=1, keepdim=True)
    return z * safe_ratio(z.sum(dim=1, keepdim=True), top_sum).exp()


@register_postprocessor("react")
class ReAct(Postprocessor):
    family = "activation"
    needs_features = True
    needs_fit = True
    defaults = {"percentile": 90}
    ranges = {"percentile": Number(ge=0, le=100)}
    fit_params = ("percentile",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.threshold = percentile(train.features, self.params["percentile"])

    def score(self, outputs: Outputs) -> torch.Tensor:
        return shaped_energy(outputs, lambda z: z.clamp(max=self.threshold))


@register_postprocessor("ash")
class ASH(Postprocessor):
    family = "activation"
    needs_features = True
    defaults = {"percentile": 90, "variant": "b"}
    ranges = {"percentile": PRUNING_PERCENTILE, "variant": OneOf("b", "p", "s")}  # ASH-B, ASH-P, ASH-S

    def score(self, outputs: Outputs) -> torch.Tensor:
        k = kept_count(outputs.features.shape[1], self.params["percentile"], self.name)
        return shaped_energy(outputs, lambda z: ash(z, k, self.params["variant"]))


@register_postprocessor("scale")
class SCALE(Postprocessor):
    family = "activation"
    needs_features = True
    defaults = {"percentile": 85}
    ranges = {"percentile": PRUNING_PERCENTILE}

    def score(self, outputs: Outputs) -> torch.Tensor:
        k = kept_count(outputs.features.shape[1], self.params["percentile"], self.name)
        return shaped_energy(outputs, lambda z: scale(z, k))


@register_postprocessor("dice")
class DICE(Postprocessor):
    family = "activation"
    needs_features = True
    needs_fit = True
    defaults = {"percentile": 90}
    ranges = {"percentile": PRUNING_PERCENTILE}
    fit_params = ("percentile",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        weight = train.fc[0].double()
        contribution = weight * column_mean(train.features)
        threshold = percentile(contribution, self.params["percentile"])
        self.masked_weight = weight * (contribution > threshold)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return shaped_energy(outputs, lambda z: z, weight=self.masked_weight)


@register_postprocessor("vra")
class VRA(Postprocessor):
    family = "activation"
    needs_features = True
    needs_fit = True
    defaults = {"percentile_high": 90, "percentile_low": 10}
    ranges = {"percentile_high": Number(ge=0, le=100), "percentile_low": Number(ge=0, le=100)}
    fit_params = ("percentile_high", "percentile_low")

    def fit(self, train: Outputs, val: Outputs) -> None:
        low, high = self.params["percentile_low"], self.params["percentile_high"]
        if low > high:
            raise InvalidHyperparameter(f"vra: percentile_low={low} must not exceed percentile_high={high}")
        self.low, self.high = percentiles(train.features, [low, high])  # one pass pair for both

    def score(self, outputs: Outputs) -> torch.Tensor:
        return shaped_energy(outputs, lambda z: z.clamp(min=self.low, max=self.high))
