"""Scores that fit a little state on the ID validation split.

- Temperature scaling (Guo et al., ICML 2017): max softmax(f / T), with T fitted to
  minimise the negative log-likelihood of the ID validation labels, exactly within
  [0.05, 100] (`fit_temperature`; OpenOOD and Guo et al.'s code run a fixed number of
  L-BFGS steps instead, which can stop short of the optimum; ``fit: openood`` runs
  OpenOOD v1.5's fit, `openood_temperature`). The score is returned as the log-odds of
  the max softmax, log(p / (1 - p)) with p = max softmax(f / T), in float64: a strictly
  monotone transform of p, so every metric is the MSP's, but it never saturates. A small
  fitted T (a perfectly accurate validation split drives T to its lower bound 0.05)
  scales the margins 20-fold: p rounds to 1.0 once the scaled margin passes ~37 and even
  log p = -log(1 + (1 - p) / p) underflows to 0 past ~745, tying the most confident
  samples; the log-odds is -logsumexp_{j != top}(f_j - f_top) / T, finite and ordered at
  every margin (`log_odds_max_softmax`).
- KL matching (Hendrycks et al., ICML 2022): -min_c KL(p || d_c), where d_c is the mean
  validation softmax of the samples predicted as class c (classes never predicted on
  validation have no template and are skipped). Computed and returned in float64, as the
  other softmax-based scores are (see oodbench.postprocessors.softmax).
"""

from __future__ import annotations

import math

import torch

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import OneOf, Outputs, Postprocessor
from oodbench.registry import register_postprocessor


T_RANGE = (5e-2, 1e2)
BISECTION_STEPS = 200


def nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """The sign-exact slope of NLL(softmax(beta * logits), labels) in beta, as
    log(its positive part) - log(its negative part) (> 0: the NLL rises with beta).

    d NLL / d beta = mean_i sum_j p_ij (f_ij - f_iy); each part is summed in log space, so
    the sign stays right where every p_ij of a wrong class underflows (separable data)."""
    log_p = torch.log_softmax(beta * logits, dim=1)
    gap = logits - logits.gather(1, labels[:, None])
    none = torch.full_like(log_p, float("-inf"))
    rising = torch.where(gap > 0, log_p + gap.abs().log(), none)
    falling = torch.where(gap < 0, log_p + gap.abs().log(), none)
    return float(torch.logsumexp(rising.flatten(), 0) - torch.logsumexp(falling.flatten(), 0))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in T_RANGE minimising NLL(softmax(logits / T), labels), to float precision.

    The NLL is convex in beta = 1/T (a log-sum-exp of linear functions minus a linear
    one), so its slope in beta is monotone: bisection on the sign of that slope (exact even
    where softmax saturates, `nll_slope`) over log beta finds the bounded optimum in every
    case. When validation accuracy is 100% with every margin positive, the NLL keeps falling
    as T -> 0 and the fit returns the lower bound 0.05; when the NLL falls as T grows without
    end (labels unrelated to the logits) it returns the upper bound 100. Logits that carry
    no information (every logit of a row equal) leave the NLL flat: T = 1."""
    logits = logits.detach().double()
    labels = labels.long()
    low, high = math.log(1 / T_RANGE[1]), math.log(1 / T_RANGE[0])  # log beta
    if math.isnan(nll_slope(logits, labels, 1.0)):
        return 1.0
    if nll_slope(logits, labels, math.exp(high)) <= 0:
        return T_RANGE[0]
    if nll_slope(logits, labels, math.exp(low)) >= 0:
        return T_RANGE[1]
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if nll_slope(logits, labels, math.exp(middle)) > 0:
            high = middle
        else:
            low = middle
    return float(min(max(math.exp(-(low + high) / 2), T_RANGE[0]), T_RANGE[1]))


def openood_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """OpenOOD v1.5's fit (postprocessors/temp_scaling_postprocessor.py): T starts at 1.5 and one
    ``torch.optim.LBFGS(lr=0.01, max_iter=50)`` step (no line search) lowers the float32 NLL of
    logits / T; no bounds. It often stops short of the optimum (T = 1.79 against 2.81 on a
    CIFAR-10 ResNet-56), which `fit_temperature` reaches."""
    logits = logits.detach().float()
    labels = labels.long()
    temperature = torch.full((1,), 1.5, requires_grad=True)
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(temperature.detach())


TEMPERATURE_FITS = {"exact": fit_temperature, "openood": openood_temperature}


def log_odds_max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """N x C logits -> N: log(p / (1 - p)) of p = max softmax(logits), computed as
    -logsumexp_{j != top}(f_j - f_top), which neither rounds nor underflows at any margin
    (p itself is 1.0 in float64 past a margin of ~37). A single class has 1 - p = 0: +inf."""
    top = logits.max(dim=1, keepdim=True)
    others = (logits - top.values).scatter(1, top.indices, float("-inf"))
    return -torch.logsumexp(others, dim=1)


def _labelled(val: Outputs, method: str) -> torch.Tensor:
    if val.labels is None or (val.labels < 0).any():
        raise OodbenchError(f"{method} needs labelled ID validation outputs")
    return val.labels


@register_postprocessor("temp_scaling", "temperature_scaling")
class TemperatureScaling(Postprocessor):
    family = "softmax"
    needs_fit = True
    defaults = {"fit": "exact"}
    ranges = {"fit": OneOf(*TEMPERATURE_FITS)}

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.temperature = TEMPERATURE_FITS[self.params["fit"]](val.logits, _labelled(val, self.name))

    def score(self, outputs: Outputs) -> torch.Tensor:
        return log_odds_max_softmax(outputs.logits.double() / self.temperature)


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
        return -kl.min(dim=1).values
