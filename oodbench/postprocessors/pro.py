"""PRO, Perturbation-Rectified OOD detection (Chen et al., "Leveraging Perturbation
Robustness to Enhance Out-of-Distribution Detection", CVPR 2025), Algorithm 1.

For a differentiable score g of the logits (higher = more ID), starting at the input
x_0 = x:

    s_t = g(f(x_t)),   x_{t+1} = x_t - eps * sign(grad_x g(f(x_t))),   t = 0..K
    score(x) = min(s_0, ..., s_K)

The minimum always includes the clean score s_0, so PRO never scores above its base
score; the prediction stays the clean argmax. No projection, clamping or noise.
Cost per image: K+1 forward and K backward passes, batched.

**Precision.** The recorded scores s_t are the base score of the float64 logits, so
saturated samples keep their order (a float32 softmax is exactly 1.0 for a 10-class logit
margin above ~17, tying every such sample); the gradient that sets each step's direction is
taken in the model's precision, as the reference code does, so the trajectory is the
reference's.

**Units of eps.** Every oodbench model takes [0,1] images and normalises inside its
adapter, after the perturbation: eps is a step in [0,1]-pixel units for every model.
(The reference code perturbs OpenOOD's already normalised tensors, so its eps equals
eps * std_c here; for RobustBench models, which take [0,1] inputs, the two coincide.)

Base scores: ``pro_msp`` max softmax; ``pro_ent`` negative entropy; ``pro_msp_t`` max
softmax(f / T); ``pro_gen`` GEN (gamma, top_m). For models that output probabilities
the logits are their logarithm, so softmax(f) is the model's probabilities themselves.

During a validation search the combinations share work (`PRO.grid_batch`): one clean
forward pass serves them all, one clean gradient each base score (all hyperparameters but
eps and K), and one trajectory of the largest K each eps, since the minimum over the first
K+1 scores of a longer trajectory is exactly PRO with K steps.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from oodbench.postprocessors.base import Integer, Number
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.postprocessors.softmax import GEN, generalized_entropy, negative_entropy
from oodbench.registry import register_postprocessor


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=1).max(dim=1).values


def recorded(base_score: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The score PRO records for `logits`: the base score of the float64 logits (the gradient
    is taken in the model's precision, as the reference code does; see the module notes)."""
    with torch.no_grad():
        return base_score(logits.detach().double())


def scored_gradient(base_score: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the recorded score at `x`, the gradient of the base score with respect to `x`)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(base_score(logits).sum(), x)
    return recorded(base_score, logits), grad


def pro_trajectory(base_score: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor,
                   eps: float | torch.Tensor, steps: int,
                   first: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """B x (steps + 1) scores s_0..s_K along PRO's signed-gradient descent from `x`.

    `eps`: the step on `x`, a number or a tensor broadcast over its channels (1 x C x 1 x 1);
    `first`: (s_0, the gradient at x_0) when already taken (the gradient may be None when
    `steps` is 0); they do not depend on eps, so a search takes them once for all eps."""
    if first is not None and steps == 0:
        return first[0][:, None]
    scores = []
    for step in range(steps):
        if step == 0 and first is not None:
            score, grad = first
        else:
            score, grad = scored_gradient(base_score, model, x)
        scores.append(score)
        x = x - eps * grad.sign()
    with torch.no_grad():
        scores.append(recorded(base_score, model(x)))
    return torch.stack(scores, dim=1)


class PRO(InputGradientPostprocessor):
    """PRO over the base score `base_score(logits)`; subclasses add its hyperparameters."""

    defaults = {"eps": 1e-3, "K": 1}
    ranges = {"eps": Number(ge=0), "K": Integer(ge=0)}
    grid_params = ("eps", "K")

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_params(self, num_classes: int) -> str:
        """The hyperparameters of the base score (all but eps and K), as a key."""
        return json.dumps({k: v for k, v in self.params.items() if k not in ("eps", "K")}, sort_keys=True,
                          default=str)

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.grid_batch(model, x, [self])[0]

    def grid_batch(self, model: nn.Module, x: torch.Tensor, methods: list["PRO"]) -> list[torch.Tensor]:
        """PRO scores of `x` under each of `methods`: one clean forward pass for all, one clean
        gradient per base score, one trajectory per (base score, eps) of the largest K asked."""
        stepping = any(method.params["K"] > 0 for method in methods)
        with torch.set_grad_enabled(stepping):
            x0 = x.detach().requires_grad_(stepping)
            logits = model(x0)
        groups: dict[str, list[PRO]] = {}
        for method in methods:
            groups.setdefault(method.base_params(logits.shape[1]), []).append(method)
        needs_gradient = [any(method.params["K"] > 0 for method in group) for group in groups.values()]
        trajectories: dict[tuple[str, float], torch.Tensor] = {}
        for index, (key, group) in enumerate(groups.items()):
            base_score = group[0].base_score
            with torch.set_grad_enabled(needs_gradient[index]):
                value = base_score(logits)
                grad = (torch.autograd.grad(value.sum(), x0, retain_graph=any(needs_gradient[index + 1:]))[0]
                        if needs_gradient[index] else None)
            value = recorded(base_score, logits)
            longest: dict[float, int] = {}
            for method in group:
                eps = float(method.params["eps"])
                longest[eps] = max(longest.get(eps, 0), method.params["K"])
            for eps, steps in longest.items():
                trajectories[key, eps] = pro_trajectory(base_score, model, x, eps, steps, (value, grad))
        return [trajectories[method.base_params(logits.shape[1]), float(method.params["eps"])]
                [:, : method.params["K"] + 1].min(dim=1).values for method in methods]


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
    grid_params = (*PRO.grid_params, "temperature")

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return max_softmax(logits, float(self.params["temperature"]))


@register_postprocessor("pro_gen")
class ProGEN(PRO):
    defaults = {**PRO.defaults, "gamma": 0.1, "top_m": 100}
    ranges = {**PRO.ranges, **GEN.ranges}
    grid_params = (*PRO.grid_params, "gamma", "top_m")

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        return generalized_entropy(logits, self.params["gamma"], self.params["top_m"])

    def base_params(self, num_classes: int) -> str:
        # M is capped at the class count, so larger M give the same trajectory
        return json.dumps([self.params["gamma"], min(int(self.params["top_m"]), num_classes)])
