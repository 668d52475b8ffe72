"""Scores computed from the logits alone (f = logits, p = softmax(f)).

- MSP, maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): max_c p_c.
- MLS, maximum logit (Hendrycks et al., ICML 2022): max_c f_c.
- Entropy: the negative Shannon entropy, sum_c p_c log p_c.
- EBO, energy (Liu et al., NeurIPS 2020): T logsumexp(f / T).
- GEN, generalized entropy (Liu et al., CVPR 2023): -sum over the M largest p_c of
  p_c^g (1 - p_c)^g, M capped at the number of classes.
"""

from __future__ import annotations

import torch

from oodbench.postprocessors.base import Integer, Number, Outputs, Postprocessor
from oodbench.registry import register_postprocessor


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1)


def generalized_entropy(logits: torch.Tensor, gamma: float, top_m: int) -> torch.Tensor:
    """GEN's score, higher = more ID; differentiable (PRO-GEN reuses it)."""
    probs = torch.softmax(logits, dim=1)
    top = probs.topk(min(int(top_m), probs.shape[1]), dim=1).values
    return -(top.pow(gamma) * (1 - top).pow(gamma)).sum(dim=1)


@register_postprocessor("msp")
class MSP(Postprocessor):
    family = "softmax"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return torch.softmax(outputs.logits, dim=1).max(dim=1).values


@register_postprocessor("mls", "max_logit")
class MaxLogit(Postprocessor):
    family = "logit"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return outputs.logits.max(dim=1).values


@register_postprocessor("entropy")
class Entropy(Postprocessor):
    family = "softmax"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return negative_entropy(outputs.logits)


@register_postprocessor("ebo", "energy")
class Energy(Postprocessor):
    family = "logit"
    defaults = {"temperature": 1.0}
    ranges = {"temperature": Number(gt=0)}

    def score(self, outputs: Outputs) -> torch.Tensor:
        t = float(self.params["temperature"])
        return t * torch.logsumexp(outputs.logits / t, dim=1)


@register_postprocessor("gen")
class GEN(Postprocessor):
    family = "softmax"
    defaults = {"gamma": 0.1, "top_m": 100}
    ranges = {"gamma": Number(gt=0), "top_m": Integer(ge=1)}

    def score(self, outputs: Outputs) -> torch.Tensor:
        return generalized_entropy(outputs.logits, self.params["gamma"], self.params["top_m"])
