"""GEN on ReAct-shaped features, from the PRO paper's code (Chen et al., CVPR 2025), and PRO
over it.

With z the penultimate features, t the p-th percentile of the fit split's activations
(ReAct, Sun et al., NeurIPS 2021) and (W, b) the classifier:

    f' = W min(z, t) + b,   gen_react(x) = GEN(softmax(f'))   (gamma, top_m; Liu et al., CVPR 2023)

``pro_gen_react`` runs PRO (Algorithm 1, see oodbench.postprocessors.pro) on that score:
each step differentiates through the model, the clipping and the classifier. The reference
code's ``gen_react`` takes t on the ID *validation* activations (OpenOOD's ReAct does too);
oodbench fits on the experiment's ``fit_split`` (train, as ReAct's paper), and the
``openood`` convention profile fits both on validation. The reference has no PRO-GEN-ReAct
(its ``pro_ent_react`` config has no implementation); its GEN-ReAct search lists are
p in {85, 90, 95, 99}, gamma in {0.01, 0.1, 0.5, 5}, M in {500}. Scores are float64.
"""

from __future__ import annotations

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Number, Outputs, Postprocessor, in_blocks
from oodbench.postprocessors.pro import ProGEN
from oodbench.postprocessors.shaping import percentile
from oodbench.postprocessors.softmax import GEN, generalized_entropy
from oodbench.registry import register_postprocessor


def clipped_logits(features: torch.Tensor, fc: tuple[torch.Tensor, torch.Tensor], threshold: float) -> torch.Tensor:
    """W min(z, t) + b for features z (N x D) and the classifier (W: C x D, b: C)."""
    weight, bias = fc
    return features.clamp(max=threshold) @ weight.to(features.dtype).T + bias.to(features.dtype)


class ReActThreshold:
    """Fits t, the `percentile`-th percentile of every activation of the fit split."""

    needs_fit = True
    needs_features = True
    fit_params = ("percentile",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        if train.features is None:
            raise OodbenchError(f"{self.name} needs the penultimate features of the fit split")
        self.threshold = percentile(train.features, self.params["percentile"])


@register_postprocessor("gen_react")
class GENReAct(ReActThreshold, Postprocessor):
    family = "activation"
    defaults = {"percentile": 90, **GEN.defaults}
    ranges = {"percentile": Number(ge=0, le=100), **GEN.ranges}

    def score(self, outputs: Outputs) -> torch.Tensor:
        fc = tuple(t.double() for t in outputs.fc)
        return in_blocks(lambda z: generalized_entropy(clipped_logits(z.double(), fc, self.threshold),
                                                       self.params["gamma"], self.params["top_m"]), outputs.features)


@register_postprocessor("pro_gen_react")
class ProGENReAct(ReActThreshold, ProGEN):
    defaults = {**ProGEN.defaults, "percentile": 90}
    ranges = {**ProGEN.ranges, "percentile": Number(ge=0, le=100)}

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        features, _ = model.features(x)
        return clipped_logits(features, model.fc, self.threshold)
