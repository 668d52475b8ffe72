"""LINe: leveraging important neurons (Ahn et al., "LINe: Out-of-Distribution Detection by
Leveraging Important Neurons", CVPR 2023; reference code
github.com/YongHyun-Ahn/LINe-Out-of-Distribution-Detection-by-Leveraging-Important-Neurons,
``models/route.py`` ``RouteLUNCH`` and ``precompute.py``).

Importance: the first-order Taylor (Shapley) contribution of penultimate unit d to the
logit of class c, A[c, d] = mean over the fit samples *labelled* c of z_d W[c, d] (the
activation times the gradient of the class's logit). Per class c:

- the units kept for a sample predicted c are those with A[c, d] above the ``p_a``-th
  percentile of A[c, :];
- the classifier used for it is W masked where |A[c, d]| W[j, d] is at or below the
  ``p_w``-th percentile of that C x D matrix (DICE-like, class-conditional).

Scoring: z' = min(z, ``clip_threshold``) (an absolute bound on the activations, as the
reference clips), c = argmax(W z' + b), and score = logsumexp(W_c (z' * keep_c) + b)
(its energy score). Defaults are the reference's CIFAR-10 DenseNet setting (p_w = p_a = 90,
clip 1.0); its search lists take the values its demos use (CIFAR-100: p_a = 10; ImageNet
ResNet-50: p_w = p_a = 10, clip 0.8). The masked classifiers are built per predicted class
when scoring, not stored as the reference's C x C x D tensor. Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from oodbench.postprocessors.base import BLOCK_ROWS, Number, Outputs, Postprocessor, in_blocks
from oodbench.postprocessors.shaping import PRUNING_PERCENTILE
from oodbench.registry import register_postprocessor


def taylor_importance(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """C x D: mean over the samples labelled c of z * W_c (zero for a class with no sample)."""
    weight = weight.double()
    sums = torch.zeros_like(weight)
    counts = torch.zeros(weight.shape[0], dtype=torch.float64)
    for start in range(0, len(features), BLOCK_ROWS):
        label = labels[start:start + BLOCK_ROWS]
        sums.index_add_(0, label, features[start:start + BLOCK_ROWS].double() * weight[label])
        counts += torch.bincount(label, minlength=weight.shape[0]).double()
    return sums / counts.clamp(min=1)[:, None]


@register_postprocessor("line")
class LINe(Postprocessor):
    family = "activation"
    needs_features = True
    needs_fit = True
    defaults = {"p_w": 90, "p_a": 90, "clip_threshold": 1.0}
    ranges = {"p_w": PRUNING_PERCENTILE, "p_a": PRUNING_PERCENTILE, "clip_threshold": Number(gt=0)}
    fit_params = ("p_w", "p_a")

    def fit(self, train: Outputs, val: Outputs) -> None:
        weight = train.fc[0].double()
        self.importance = taylor_importance(train.features, train.labels, weight)
        magnitude = self.importance.abs().numpy()
        self.weight_thresholds = torch.tensor([np.percentile(magnitude[c][None, :] * weight.numpy(), self.params["p_w"])
                                               for c in range(weight.shape[0])], dtype=torch.float64)
        unit_thresholds = np.percentile(self.importance.numpy(), self.params["p_a"], axis=1)
        self.kept_units = self.importance > torch.from_numpy(unit_thresholds)[:, None]

    def masked_weight(self, weight: torch.Tensor, c: int) -> torch.Tensor:
        """W where |A[c]| W exceeds class c's threshold, zero elsewhere."""
        return weight * (self.importance[c].abs()[None, :] * weight > self.weight_thresholds[c])

    def score(self, outputs: Outputs) -> torch.Tensor:
        weight, bias = (t.double() for t in outputs.fc)

        def block(z: torch.Tensor) -> torch.Tensor:
            z = z.double().clamp(max=self.params["clip_threshold"])
            predicted = (z @ weight.T + bias).argmax(dim=1)
            kept = z * self.kept_units[predicted]
            logits = torch.empty(len(z), weight.shape[0], dtype=torch.float64)
            for c in predicted.unique().tolist():
                rows = predicted == c
                logits[rows] = kept[rows] @ self.masked_weight(weight, c).T + bias
            return torch.logsumexp(logits, dim=1)

        return in_blocks(block, outputs.features)
