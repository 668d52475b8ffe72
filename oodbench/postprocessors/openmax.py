"""OpenMax (Bendale & Boult, CVPR 2016): extreme-value recalibration of the logits.

Fit, per class c, on the fit (train) samples of class c that the model classifies
correctly: the mean logit vector MAV_c, their Euclidean distances to it, and a Weibull
fitted to the `tail_size` largest of those distances, as libMR's ``FitHigh`` does: the
tail is shifted to t + 1 - min(tail) and the two-parameter Weibull's maximum-likelihood
(scale lambda_c, shape k_c) is fitted to it; the w-score of a distance d is the Weibull
CDF w_c(d) = 1 - exp(-((d + 1 - min(tail)) / lambda_c)^k_c).

Score, for logits f of one sample: the `alpha` largest logits get weights
omega = 1, (alpha-1)/alpha, ..., 1/alpha (the others 0); with w_c = w_c(||f - MAV_c||),
revised logits s_c = f_c (1 - omega_c w_c) and the unknown-class logit
u = sum_c f_c omega_c w_c,

    p_unknown = exp(u) / (sum_c exp(s_c) + exp(u)),
    score = log(1 - p_unknown) = logsumexp(s) - logsumexp(s, u).

OpenOOD scores -p_unknown (in float64); log(1 - p_unknown) orders the samples the same
way and keeps that order in float32, where -p_unknown rounds to -1 for every sample
with p_unknown > 1 - 6e-8 (17 of 1,000 CIFAR-10 test images with ResNet-56).

As in OpenOOD v1.5: one "channel" (the logits), Euclidean distances (the paper's ImageNet
code mixes in a cosine term), alpha = 3, tail 20 (a class with fewer correct samples
fits on all of them), and the shift of 1 of libmr 0.1.9, the release OpenOOD installs
(libMR's C++ sources elsewhere default to 10000). Differences: the MLE's root is found
to 1e-12 (libMR stops at a relative 1e-6 on the scaled shape; w-scores agree with
libmr 0.1.9's to about 1e-6); a class with fewer than two distinct tail distances is
an error (libMR's fit fails and its w-scores become -9999).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp, softmax

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Integer, InvalidHyperparameter, Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor

EXACT_DISTANCES = "donot_use_mm_for_euclid_dist"  # cdist without the |a|^2 + |b|^2 - 2ab shortcut
LIBMR_SHIFT = 1.0  # libmr 0.1.9's translate_amount: the tail is fitted as t + 1 - min(tail)


def fit_weibull(tail: np.ndarray) -> tuple[float, float, float]:
    """(scale, shape, shift): the maximum-likelihood Weibull of tail + shift, shift = 1 - min(tail).

    The MLE in log space (a Gumbel for minima): with y = log(tail + shift) rescaled to
    x = (y - max y) / range y in [-1, 0], sigma solves sigma + mean(x) - sum_i w_i x_i = 0,
    w = softmax(x / sigma); mu = sigma * log(mean(exp(x / sigma))). Back in y units,
    scale = exp(mu), shape = 1 / sigma."""
    shift = LIBMR_SHIFT - float(tail.min())
    y = np.log(tail.astype(np.float64) + shift)
    top, spread = y.max(), y.max() - y.min()
    if not spread > 0:
        raise OodbenchError("openmax: the distances of a class's tail are all equal; a Weibull cannot be fitted")
    x = (y - top) / spread

    def slope(sigma: float) -> float:
        return sigma + x.mean() - float(softmax(x / sigma) @ x)

    from scipy.optimize import brentq  # here, not at import: scipy.optimize costs every command 0.6 s

    upper = 1.0
    while slope(upper) < 0:
        upper *= 2
    sigma = brentq(slope, 1e-8, upper, xtol=1e-12, rtol=4 * np.finfo(float).eps)
    mu = sigma * (logsumexp(x / sigma) - np.log(len(x)))
    return float(np.exp(spread * mu + top)), float(1 / (spread * sigma)), shift


def w_scores(distances: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """N x C Weibull CDFs of each sample's distance to each class's mean (0 below the support)."""
    shifted = distances + shift
    power = torch.exp(shape * (shifted.clamp_min(1e-300).log() - scale.log()))
    return torch.where(shifted > 0, -torch.expm1(-power), 0)


@register_postprocessor("openmax")
class OpenMax(Postprocessor):
    family = "logit"
    needs_fit = True
    defaults = {"alpha": 3, "tail_size": 20}
    ranges = {"alpha": Integer(ge=1), "tail_size": Integer(ge=2)}  # alpha at most the classes, checked on the data
    fit_params = ("tail_size",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        num_classes = train.logits.shape[1]
        correct = train.labels == train.predictions
        means, weibulls = [], []
        for c in range(num_classes):  # one class's rows in float64 at a time, never all the logits
            rows = train.logits[correct & (train.labels == c)].double()
            if len(rows) < 2:
                raise OodbenchError(f"openmax: class {c} has {len(rows)} correctly classified fit samples; "
                                    "its Weibull needs at least 2")
            means.append(rows.mean(dim=0))
            distances = (rows - means[-1]).norm(dim=1).numpy()
            weibulls.append(fit_weibull(np.sort(distances)[-self.params["tail_size"]:]))
        self.class_means = torch.stack(means)
        self.scale, self.shape, self.shift = (torch.tensor(column, dtype=torch.float64) for column in zip(*weibulls))

    def score(self, outputs: Outputs) -> torch.Tensor:
        alpha = self.params["alpha"]
        if alpha > len(self.class_means):
            raise InvalidHyperparameter(f"openmax: alpha={alpha} must be at most the {len(self.class_means)} classes")
        rank_weights = torch.arange(alpha, 0, -1, dtype=torch.float64) / alpha

        def block(f: torch.Tensor) -> torch.Tensor:
            f = f.double()
            omega = torch.zeros_like(f).scatter(1, f.topk(alpha, dim=1).indices, rank_weights.expand(len(f), -1))
            distances = torch.cdist(f, self.class_means, compute_mode=EXACT_DISTANCES)
            revision = omega * w_scores(distances, self.scale, self.shape, self.shift)
            revised = f * (1 - revision)
            unknown = (f * revision).sum(dim=1, keepdim=True)
            return torch.logsumexp(revised, dim=1) - torch.logsumexp(torch.cat([revised, unknown], dim=1), dim=1)

        return in_blocks(block, outputs.logits).float()
