"""GradNorm (Huang et al., NeurIPS 2021), from cached outputs: no backward pass.

GradNorm scores a sample by the L1 norm of the gradient, with respect to the last
layer's weights W, of the KL divergence between the uniform distribution and the
softmax p = softmax(W z + b). Up to a constant, that loss is -(1/C) sum_c log p_c, whose
gradient with respect to the logits is p - 1/C; the gradient with respect to W is the
outer product (p - 1/C) z', and the L1 norm of an outer product factorises:

    score = || p - 1/C ||_1 * || z ||_1        (higher = more ID).

The bias gradient is not part of the score, as in the paper and OpenOOD.
"""

from __future__ import annotations

import torch

from oodbench.postprocessors.base import Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor


def gradnorm(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.double(), dim=1)
    return (probs - 1 / probs.shape[1]).abs().sum(dim=1) * features.double().abs().sum(dim=1)


@register_postprocessor("gradnorm")
class GradNorm(Postprocessor):
    family = "gradient"
    needs_features = True

    def score(self, outputs: Outputs) -> torch.Tensor:
        return in_blocks(gradnorm, outputs.logits, outputs.features).float()
