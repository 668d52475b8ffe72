"""OptFS: optimal feature shaping (Zhao et al., "Towards Optimal Feature-Shaping Methods for
Out-of-Distribution Detection", ICLR 2024; reference code github.com/Qinyu-Allen-Zhao/OptFSOOD,
``detector/ours.py``).

A piecewise-constant shaping function theta over the values of the penultimate features,
fitted in closed form on ID data alone. On the fit split's features z and predictions
y^ (the argmax of its logits), with q_lo, q_hi the 0.1% and 99.9% quantiles of every
feature value, the intervals are [x_k, x_k + w) for x_k = q_lo + k w below q_hi, w =
(q_hi - q_lo) / 100 (``numpy.arange``), and

    I_k = mean_i sum_d [z_id in interval k] W[y^_i, d] z_id,     theta = 1000 I / ||I||_2.

Shaping: z'_d = theta_k z_d for z_d in interval k, 0 outside every interval. The score is
the reference's "Ours (V)": the predicted class's logit of the shaped features without the
bias, sum_d W[y^, d] z'_d, with y^ the argmax of the unshaped logits. Its energy variant
(logsumexp(W z' + b)) is the composite ``optfs+ebo``, and ``optfs+<scorer>`` any other
(`oodbench.postprocessors.compose`). No hyperparameters. The reference accumulates I in
float32; oodbench in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from oodbench.postprocessors.base import BLOCK_ROWS, Outputs, Postprocessor, in_blocks
from oodbench.postprocessors.streaming import quantiles
from oodbench.registry import register_postprocessor

INTERVALS = 100
TAIL = 1e-3  # the quantiles bounding the intervals
NORM = 1000.0  # ||theta||_2


def fit_shaping(features: torch.Tensor, predictions: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The interval left edges (float64, K), their width and theta (K) from the fit split."""
    # np.quantile of every value, without its copy of the N x D values; float32, as NumPy returns them
    low, high = (np.float32(q) for q in quantiles(features.detach().cpu(), [TAIL, 1 - TAIL]))
    width = (high - low) / INTERVALS
    lefts = torch.from_numpy(np.arange(low, high, width))
    weight = weight.double()
    importance = torch.zeros(len(lefts), dtype=torch.float64)
    for start in range(0, len(features), BLOCK_ROWS):
        z = features[start:start + BLOCK_ROWS].double()
        contribution = weight[predictions[start:start + BLOCK_ROWS]] * z
        index = interval_index(z, lefts, width)
        importance.scatter_add_(0, index.clamp(min=0).flatten(), torch.where(index >= 0, contribution, 0).flatten())
    importance /= len(features)
    return {"lefts": lefts, "width": torch.tensor(width, dtype=torch.float64),
            "theta": importance / importance.norm() * NORM}


def interval_index(z: torch.Tensor, lefts: torch.Tensor, width: float | torch.Tensor) -> torch.Tensor:
    """k with x_k <= z < x_k + w for each value; -1 outside every interval."""
    index = torch.bucketize(z.double(), lefts, right=True) - 1
    inside = (index >= 0) & (z.double() < lefts[index.clamp(min=0)] + width)
    return torch.where(inside, index, -1)


def shaped(z: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """theta_k z in interval k, 0 outside (in z's dtype, float64 for the composites)."""
    index = interval_index(z, state["lefts"], state["width"])
    factor = state["theta"].to(z.dtype)[index.clamp(min=0)]
    return torch.where(index >= 0, z * factor, 0)


@register_postprocessor("optfs")
class OptFS(Postprocessor):
    family = "activation"
    needs_features = True
    needs_fit = True

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.shaping = fit_shaping(train.features, train.logits.argmax(dim=1), train.fc[0])

    def score(self, outputs: Outputs) -> torch.Tensor:
        weight = outputs.fc[0].double()

        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return (weight[logits.argmax(dim=1)] * shaped(z.double(), self.shaping)).sum(dim=1)

        return in_blocks(block, outputs.features, outputs.logits)
