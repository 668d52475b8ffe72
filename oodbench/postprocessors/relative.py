"""Relative feature errors to the predicted class's mean: CARef and CADRef (Ling et al.,
"CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative Feature
Leveraging", CVPR 2025, arXiv:2503.00325; reference code github.com/LingAndZero/CADRef,
``ood_methods/CARef.py`` and ``CADRef.py``).

With z the penultimate features, f the logits, c = argmax f the predicted class and mu_c
the mean fit-split feature of the samples *predicted* c (as the reference groups them):

- ``caref``: score = -||z - mu_c||_1 / ||z||_1;
- ``cadref``: the relative error d = z - mu_c is split by the sign of the class's weights
  s = sign(W_c): E+ = ||max(s d, 0)||_1 / ||z||_1 (the part that raises the class's logit)
  and E- = ||max(-s d, 0)||_1 / ||z||_1; with S a logit score (``logit_score``: ``ebo``
  logsumexp f, the reference's default; ``mls`` max f; ``msp`` max softmax; ``gen`` the
  reciprocal of GEN's sum over the top M = max(C // 10, 10) probabilities, gamma = 0.1) and
  S_bar its mean over the fit split,

      score = -(E+ / S(f) + E- / S_bar).

A class that no fit sample is predicted as has no mean in the reference (its code fails);
oodbench takes the mean of every fit feature for it. Computed in float64.
"""

from __future__ import annotations

from typing import Callable

import torch

from oodbench.postprocessors.base import BLOCK_ROWS, OneOf, Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor


def reciprocal_gen(logits: torch.Tensor) -> torch.Tensor:
    """1 / sum over the top max(C // 10, 10) probabilities of p^0.1 (1 - p)^0.1 (the reference's GEN)."""
    probs = torch.softmax(logits, dim=1)
    top = probs.topk(min(max(logits.shape[1] // 10, 10), logits.shape[1]), dim=1).values
    return 1 / (top.pow(0.1) * (1 - top).pow(0.1)).sum(dim=1)


LOGIT_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ebo": lambda f: torch.logsumexp(f, dim=1),
    "mls": lambda f: f.max(dim=1).values,
    "msp": lambda f: torch.softmax(f, dim=1).max(dim=1).values,
    "gen": reciprocal_gen,
}


def predicted_class_means(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """C x D float64: the mean feature of the fit samples predicted as each class (the mean
    of all of them for a class none is predicted as), accumulated over row blocks."""
    classes = logits.shape[1]
    sums = torch.zeros(classes, features.shape[1], dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    for start in range(0, len(features), BLOCK_ROWS):
        predicted = logits[start:start + BLOCK_ROWS].argmax(dim=1)
        sums.index_add_(0, predicted, features[start:start + BLOCK_ROWS].double())
        counts += torch.bincount(predicted, minlength=classes).double()
    overall = sums.sum(dim=0) / counts.sum()
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)


class ClassMeans:
    """Fits the predicted-class means of the fit split."""

    family = "feature"
    needs_features = True
    needs_fit = True

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.means = predicted_class_means(train.features, train.logits)


@register_postprocessor("caref")
class CARef(ClassMeans, Postprocessor):
    def score(self, outputs: Outputs) -> torch.Tensor:
        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            z = z.double()
            return -(z - self.means[logits.argmax(dim=1)]).abs().sum(dim=1) / z.abs().sum(dim=1)

        return in_blocks(block, outputs.features, outputs.logits)


@register_postprocessor("cadref")
class CADRef(ClassMeans, Postprocessor):
    defaults = {"logit_score": "ebo"}
    ranges = {"logit_score": OneOf(*LOGIT_SCORES)}
    fit_params = ("logit_score",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        super().fit(train, val)
        logit_score = LOGIT_SCORES[self.params["logit_score"]]
        self.mean_logit_score = float(in_blocks(lambda f: logit_score(f.double()), train.logits).mean())

    def score(self, outputs: Outputs) -> torch.Tensor:
        weight = outputs.fc[0].double()
        logit_score = LOGIT_SCORES[self.params["logit_score"]]

        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            z, predicted = z.double(), logits.argmax(dim=1)
            signed = (z - self.means[predicted]) * weight[predicted].sign()
            norm = z.abs().sum(dim=1)
            raising, lowering = signed.clamp(min=0).sum(dim=1) / norm, (-signed).clamp(min=0).sum(dim=1) / norm
            return -(raising / logit_score(logits.double()) + lowering / self.mean_logit_score)

        return in_blocks(block, outputs.features, outputs.logits)
