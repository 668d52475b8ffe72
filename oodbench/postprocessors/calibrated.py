"""Scores that fit a little state on the ID validation split.

- Temperature scaling (Guo et al., ICML 2017): max softmax(f / T), with T fitted by
  L-BFGS to minimise the negative log-likelihood of the ID validation labels. The score
  is returned as log max softmax(f / T) in float64: a monotone transform, so every
  metric is unchanged, but a small fitted T (a perfectly accurate validation split drives
  T to its lower bound) would otherwise saturate every softmax to 1.0 and tie all scores.
- KL matching (Hendrycks et al., ICML 2022): -min_c KL(p || d_c), where d_c is the mean
  validation softmax of the samples predicted as class c (classes never predicted on
  validation have no template and are skipped).
"""

from __future__ import annotations

import torch

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.registry import register_postprocessor


T_RANGE = (5e-2, 1e2)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The T minimising NLL(softmax(logits / T), labels), by L-BFGS on log T, within T_RANGE.

    The bound matters when validation accuracy is 100%: the NLL then keeps falling as
    T -> 0 and every softmax would saturate to 1 (all scores tied)."""
    logits = logits.detach().double()
    labels = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def log_max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log max softmax, exact even where 1 - MSP is below float precision:
    -log(1 + sum_{j != top} exp(f_j - f_top)) = -softplus(logsumexp_{j != top}(f_j - f_top))."""
    top = logits.max(dim=1, keepdim=True)
    others = (logits - top.values).scatter(1, top.indices, float("-inf"))
    return -torch.nn.functional.softplus(torch.logsumexp(others, dim=1))


def _labelled(val: Outputs, method: str) -> torch.Tensor:
    if val.labels is None or (val.labels < 0).any():
        raise OodbenchError(f"{method} needs labelled ID validation outputs")
    return val.labels


@register_postprocessor("temp_scaling", "temperature_scaling")
class TemperatureScaling(Postprocessor):
    family = "softmax"
    needs_fit = True

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.temperature = fit_temperature(val.logits, _labelled(val, self.name))

    def score(self, outputs: Outputs) -> torch.Tensor:
        return log_max_softmax(outputs.logits.double() / self.temperature)


@register_postprocessor("klm", "kl_matching")
class KLMatching(Postprocessor):
    family = "softmax"
    needs_fit = True

    def fit(self, train: Outputs, val: Outputs) -> None:
        probs = torch.softmax(val.logits.double(), dim=1)
        predicted = probs.argmax(dim=1)
        templates = [probs[predicted == c].mean(dim=0) for c in predicted.unique().tolist()]
        self.templates = torch.stack(templates)  # K x C, K = classes predicted on val

    def score(self, outputs: Outputs) -> torch.Tensor:
        log_p = torch.log_softmax(outputs.logits.double(), dim=1)
        p = log_p.exp()
        log_q = self.templates.clamp_min(1e-300).log()
        # KL(p || q_k) = sum_c p_c log p_c - sum_c p_c log q_kc
        kl = (p * log_p).sum(dim=1, keepdim=True) - p @ log_q.T
        return -kl.min(dim=1).values.float()
