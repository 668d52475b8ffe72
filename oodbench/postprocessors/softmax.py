"""Scores computed from the logits alone (f = logits, p = softmax(f)).

- MSP, maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): max_c p_c.
- MLS, maximum logit (Hendrycks et al., ICML 2022): max_c f_c.
- Entropy: the negative Shannon entropy, sum_c p_c log p_c.
- EBO, energy (Liu et al., NeurIPS 2020): T logsumexp(f / T).
- GEN, generalized entropy (Liu et al., CVPR 2023): -sum over the M largest p_c of
  p_c^g (1 - p_c)^g, M capped at the number of classes.
- DOCTOR (Granese et al., "DOCTOR: A Simple Method for Detecting Misclassification
  Errors", NeurIPS 2021), with p = softmax(f / T): D_alpha = (1 - g) / g, g = sum_c p_c^2
  (the probability that two draws from p agree), and D_beta = (1 - max_c p_c) / max_c p_c;
  the harness score is -D (a misclassification detector: high = confident). The paper also
  perturbs the input as ODIN does (its epsilon); this is the perturbation-free form (its
  "totally black-box" case). The paper tunes T and epsilon for error detection on held-out
  data; oodbench's search tunes for OOD, so DOCTOR has no search list: pass ``temperature``.

The softmax-based scores (MSP, entropy, GEN) are computed from float64 logits and returned
in float64: in float32 the softmax of a confident sample saturates at exactly 1.0 (a logit
margin above ~17 for 10 classes), so samples with margins 25 and 30 tie in MSP and GEN loses
its top term (1 - p)^g = 0; in float64 they keep their order up to margins of ~36.
OpenOOD computes them in float32, so its values differ on such samples (ties, not order).
"""

from __future__ import annotations

import torch

from oodbench.postprocessors.base import Integer, Number, OneOf, Outputs, Postprocessor
from oodbench.registry import register_postprocessor


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1)


def generalized_entropy(logits: torch.Tensor, gamma: float, top_m: int) -> torch.Tensor:
    """GEN's score, higher = more ID; differentiable (PRO-GEN reuses it)."""
    probs = torch.softmax(logits, dim=1)
    return generalized_entropy_of_top(probs.topk(min(int(top_m), probs.shape[1]), dim=1).values, gamma)


def generalized_entropy_of_top(top: torch.Tensor, gamma: float) -> torch.Tensor:
    """GEN's score from the M largest probabilities of each row (N x M)."""
    return -(top.pow(gamma) * (1 - top).pow(gamma)).sum(dim=1)


@register_postprocessor("msp")
class MSP(Postprocessor):
    family = "softmax"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return torch.softmax(outputs.logits.double(), dim=1).max(dim=1).values


@register_postprocessor("mls", "max_logit")
class MaxLogit(Postprocessor):
    family = "logit"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return outputs.logits.max(dim=1).values


@register_postprocessor("entropy")
class Entropy(Postprocessor):
    family = "softmax"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return negative_entropy(outputs.logits.double())


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
    grid_params = ("gamma", "top_m")

    def score(self, outputs: Outputs) -> torch.Tensor:
        return generalized_entropy(outputs.logits.double(), self.params["gamma"], self.params["top_m"])

    def score_grid(self, outputs: Outputs, combos: list[dict]) -> list[torch.Tensor]:
        """One softmax and one sort (of the largest M) for the whole search."""
        settings = [{**self.params, **combo} for combo in combos]
        probs = torch.softmax(outputs.logits.double(), dim=1)
        top = probs.topk(min(max(int(s["top_m"]) for s in settings), probs.shape[1]), dim=1).values
        return [generalized_entropy_of_top(top[:, : min(int(s["top_m"]), probs.shape[1])].contiguous(), s["gamma"])
                for s in settings]


@register_postprocessor("doctor")
class DOCTOR(Postprocessor):
    family = "softmax"
    defaults = {"temperature": 1.0, "variant": "alpha"}
    ranges = {"temperature": Number(gt=0), "variant": OneOf("alpha", "beta")}

    def score(self, outputs: Outputs) -> torch.Tensor:
        probs = torch.softmax(outputs.logits.double() / float(self.params["temperature"]), dim=1)
        agree = probs.square().sum(dim=1) if self.params["variant"] == "alpha" else probs.max(dim=1).values
        return -(1 - agree) / agree
