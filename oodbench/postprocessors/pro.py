"""PRO, Perturbation-Rectified OOD detection (Chen et al., "Leveraging Perturbation
Robustness to Enhance Out-of-Distribution Detection", CVPR 2025), Algorithm 1.

For a differentiable score g of the logits (higher = more ID), starting at the input
x_0 = x:

    s_t = g(f(x_t)),   x_{t+1} = x_t - eps * sign(grad_x g(f(x_t))),   t = 0..K
    score(x) = min(s_0, ..., s_K)

The minimum always includes the clean score s_0, so PRO never scores above its base
score; the prediction stays the clean argmax. No projection, clamping or noise.
Cost per image: K+1 forward and K backward passes, batched.

**Units of eps.** Every oodbench model takes [0,1] images and normalises inside its
adapter, after the perturbation: eps is a step in [0,1]-pixel units for every model.
(The reference code perturbs OpenOOD's already normalised tensors, so its eps equals
eps * std_c here; for RobustBench models, which take [0,1] inputs, the two coincide.)

Base scores: ``pro_msp`` max softmax; ``pro_ent`` negative entropy; ``pro_msp_t`` max
softmax(f / T); ``pro_gen`` GEN (gamma, top_m). For models that output probabilities
the logits are their logarithm, so softmax(f) is the model's probabilities themselves.

During the validation search one trajectory of the largest K serves every smaller K
(its prefix minima), see `PRO.score`.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from oodbench.postprocessors.base import Integer, Number, Outputs
from oodbench.postprocessors.gradient import InputGradientPostprocessor, input_batches, input_gradient
from oodbench.postprocessors.softmax import GEN, generalized_entropy, negative_entropy
from oodbench.registry import register_postprocessor

TRAJECTORY_CACHE = "pro_trajectories"


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=1).max(dim=1).values


def pro_trajectory(base_score: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                   x: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """B x (steps + 1) scores s_0..s_K along PRO's signed-gradient descent from `x`."""
    scores = []
    for _ in range(steps):
        score, grad = input_gradient(lambda v: base_score(model(v)), x)
        scores.append(score)
        x = x - eps * grad.sign()
    with torch.no_grad():
        scores.append(base_score(model(x)))
    return torch.stack(scores, dim=1)


class PRO(InputGradientPostprocessor):
    """PRO over the base score `base_score(logits)`; subclasses add its hyperparameters."""

    defaults = {"eps": 1e-3, "K": 1}
    ranges = {"eps": Number(ge=0), "K": Integer(ge=0)}

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trajectory(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return pro_trajectory(self.base_score, model, x, float(self.params["eps"]), self.params["K"])

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.trajectory(model, x).min(dim=1).values

    def trajectory_params(self, num_classes: int) -> dict:
        """The hyperparameters that determine the trajectory: all but K."""
        return {k: v for k, v in self.params.items() if k != "K"}

    def score(self, outputs: Outputs) -> torch.Tensor:
        """PRO scores of `outputs`, reusing a trajectory at least K steps long computed on
        the same outputs with the same `trajectory_params`: the minimum over its first
        K+1 scores is exactly PRO with K steps. The search lists K largest first, so each
        eps costs one trajectory."""
        steps = self.params["K"]
        others = self.trajectory_params(outputs.logits.shape[1])
        key = json.dumps([self.name, id(outputs.model), others], sort_keys=True, default=str)
        trajectories = outputs.meta.setdefault(TRAJECTORY_CACHE, {})
        if key not in trajectories or trajectories[key].shape[1] <= steps:
            trajectories[key] = torch.cat([self.trajectory(outputs.model, x).detach().cpu()
                                           for x in input_batches(outputs, self.name)])
        return trajectories[key][:, : steps + 1].min(dim=1).values


@register_postprocessor("pro_msp")
class ProMSP(PRO):
    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return max_softmax(logits)


@register_postprocessor("pro_ent")
class ProEntropy(PRO):
    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return negative_entropy(logits)


@register_postprocessor("pro_msp_t")
class ProTemperatureMSP(PRO):
    defaults = {**PRO.defaults, "temperature": 1000.0}
    ranges = {**PRO.ranges, "temperature": Number(gt=0)}

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return max_softmax(logits, float(self.params["temperature"]))


@register_postprocessor("pro_gen")
class ProGEN(PRO):
    defaults = {**PRO.defaults, "gamma": 0.1, "top_m": 100}
    ranges = {**PRO.ranges, **GEN.ranges}

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return generalized_entropy(logits, self.params["gamma"], self.params["top_m"])

    def trajectory_params(self, num_classes: int) -> dict:
        # M is capped at the class count, so larger M give the same trajectory
        return {**super().trajectory_params(num_classes), "top_m": min(int(self.params["top_m"]), num_classes)}
