"""PRO, Perturbation-Rectified OOD detection (Chen et al., "Leveraging Perturbation
Robustness to Enhance Out-of-Distribution Detection", CVPR 2025), Algorithm 1.

For a differentiable score g of the logits (higher = more ID), starting at the input
x_0 = x:

    s_t = g(f(x_t)),   x_{t+1} = x_t - eps * sign(grad_x g(f(x_t))),   t = 0..K
    score(x) = min(s_0, ..., s_K)            (statistic: min, the paper's)
    score(x) = s_K                           (statistic: last)

The minimum always includes the clean score s_0, so PRO never scores above its base
score; the prediction stays the clean argmax. No projection, clamping or noise.
``statistic: last`` is the reference code's older variant (its ``pro_msp``, ``pro_ent``,
``pro_tempscale``; the paper's method is its ``pro2_*``), registered as ``pro_msp_last``,
``pro_ent_last``, ``pro_msp_t_last``. Cost per image: K+1 forward and K backward passes.

**Precision.** The recorded scores s_t are the base score of the float64 logits, so
saturated samples keep their order (a float32 softmax is exactly 1.0 for a 10-class logit
margin above ~17, tying every such sample); the gradient that sets each step's direction is
taken in the model's precision, as the reference code does, so the trajectory is the
reference's.

**Units of eps** (``eps_units``). Every oodbench model takes [0,1] images and normalises
inside its adapter, after the perturbation: with ``pixel`` (the default) eps is a step in
[0,1]-pixel units for every model. The reference code perturbs OpenOOD's already normalised
tensors, so its eps is eps * std_c in pixel units: ``normalized`` takes that step (std_c
the adapter's own normalisation, 1 for models that take [0,1] inputs, where the two coincide).

Base scores: ``pro_msp`` max softmax; ``pro_ent`` negative entropy (the reference adds
1e-10 inside its log); ``pro_msp_t`` max softmax(f / T); ``pro_gen`` GEN (gamma, top_m);
``pro_ebo`` energy T logsumexp(f / T). The reference's PRO-EBO differs from Algorithm 1: it
steps *up* the energy gradient (x + eps sign grad) and returns the last score, with K = 2
and no search list of its own; oodbench's ``pro_ebo`` is Algorithm 1 on the energy. For
models that output probabilities the logits are their logarithm.

During a validation search the combinations share work (`PRO.grid_batch`): one clean
forward pass serves them all, one clean gradient each base score (all hyperparameters but
eps, K, the statistic and the units), and one trajectory of the largest K each step size,
since the first K+1 scores of a longer trajectory are exactly those of PRO with K steps.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from oodbench.postprocessors.base import Integer, Number, OneOf
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.postprocessors.softmax import GEN, generalized_entropy, negative_entropy
from oodbench.registry import register_postprocessor

Score = Callable[[torch.Tensor], torch.Tensor]
STEP_PARAMS = ("eps", "K", "statistic", "eps_units")  # how the trajectory is walked and read


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=1).max(dim=1).values


def recorded(base_score: Score, logits: torch.Tensor) -> torch.Tensor:
    """The score PRO records for `logits`: the base score of the float64 logits (the gradient
    is taken in the model's precision, as the reference code does; see the module notes)."""
    with torch.no_grad():
        return base_score(logits.detach().double())


def scored_gradient(base_score: Score, forward: Score, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the recorded score at `x`, the gradient of the base score with respect to `x`)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = forward(x)
        (grad,) = torch.autograd.grad(base_score(logits).sum(), x)
    return recorded(base_score, logits), grad


def pro_trajectory(base_score: Score, forward: Score, x: torch.Tensor, eps: float | torch.Tensor, steps: int,
                   first: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """B x (steps + 1) scores s_0..s_K along PRO's signed-gradient descent from `x`.

    `forward`: images -> logits (the model); `eps`: the step on `x`, a number or a tensor
    broadcast over its channels (1 x C x 1 x 1); `first`: (s_0, the gradient at x_0) when
    already taken (the gradient may be None when `steps` is 0); they do not depend on eps, so
    a search takes them once for all eps."""
    if first is not None and steps == 0:
        return first[0][:, None]
    scores = []
    for step in range(steps):
        if step == 0 and first is not None:
            score, grad = first
        else:
            score, grad = scored_gradient(base_score, forward, x)
        scores.append(score)
        x = x - eps * grad.sign()
    with torch.no_grad():
        scores.append(recorded(base_score, forward(x)))
    return torch.stack(scores, dim=1)


def channel_std(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The std the model divides its [0,1] input by, 1 x C x 1 x 1 (ones when it does not)."""
    std = getattr(model, "input_std", None)
    std = torch.ones(1) if std is None else std
    return std.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


class PRO(InputGradientPostprocessor):
    """PRO over the base score `base_score(logits)`; subclasses add its hyperparameters."""

    defaults = {"eps": 1e-3, "K": 1, "statistic": "min", "eps_units": "pixel"}
    ranges = {"eps": Number(ge=0), "K": Integer(ge=0), "statistic": OneOf("min", "last"),
              "eps_units": OneOf("pixel", "normalized")}
    grid_params = STEP_PARAMS

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The logits the base score reads: the model's (PRO-GEN-ReAct reshapes its features)."""
        return model(x)

    def base_params(self, num_classes: int) -> str:
        """The hyperparameters of the base score (all but the step parameters), as a key."""
        return json.dumps({k: v for k, v in self.params.items() if k not in STEP_PARAMS}, sort_keys=True,
                          default=str)

    def step_size(self, model: nn.Module, x: torch.Tensor) -> float | torch.Tensor:
        eps = float(self.params["eps"])
        return eps if self.params["eps_units"] == "pixel" else eps * channel_std(model, x)

    def read(self, trajectory: torch.Tensor) -> torch.Tensor:
        """The score of a trajectory's first K+1 recorded scores: their minimum or the last."""
        prefix = trajectory[:, : self.params["K"] + 1]
        return prefix.min(dim=1).values if self.params["statistic"] == "min" else prefix[:, -1]

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.grid_batch(model, x, [self])[0]

    def grid_batch(self, model: nn.Module, x: torch.Tensor, methods: list["PRO"]) -> list[torch.Tensor]:
        """PRO scores of `x` under each of `methods`: one clean forward pass for all, one clean
        gradient per base score, one trajectory per (base score, step) of the largest K asked."""
        forward = lambda v: self.logits(model, v)  # noqa: E731
        stepping = any(method.params["K"] > 0 for method in methods)
        with torch.set_grad_enabled(stepping):
            x0 = x.detach().requires_grad_(stepping)
            logits = forward(x0)
        groups: dict[str, list[PRO]] = {}
        for method in methods:
            groups.setdefault(method.base_params(logits.shape[1]), []).append(method)
        needs_gradient = [any(method.params["K"] > 0 for method in group) for group in groups.values()]
        trajectories: dict[tuple[str, float, str], torch.Tensor] = {}
        step_key = lambda method: (float(method.params["eps"]), method.params["eps_units"])  # noqa: E731
        for index, (key, group) in enumerate(groups.items()):
            base_score = group[0].base_score
            with torch.set_grad_enabled(needs_gradient[index]):
                value = base_score(logits)
                grad = (torch.autograd.grad(value.sum(), x0, retain_graph=any(needs_gradient[index + 1:]))[0]
                        if needs_gradient[index] else None)
            value = recorded(base_score, logits)
            longest: dict[tuple[float, str], tuple[int, PRO]] = {}
            for method in group:
                steps = max(longest.get(step_key(method), (0, method))[0], method.params["K"])
                longest[step_key(method)] = (steps, method)
            for step, (steps, method) in longest.items():
                trajectories[(key, *step)] = pro_trajectory(base_score, forward, x, method.step_size(model, x), steps,
                                                            (value, grad))
        return [method.read(trajectories[(method.base_params(logits.shape[1]), *step_key(method))])
                for method in methods]


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


@register_postprocessor("pro_ebo", "pro_energy")
class ProEnergy(PRO):
    defaults = {**PRO.defaults, "temperature": 1.0}
    ranges = {**PRO.ranges, "temperature": Number(gt=0)}
    grid_params = (*PRO.grid_params, "temperature")

    def base_score(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.params["temperature"])
        return t * torch.logsumexp(logits / t, dim=1)


@register_postprocessor("pro_msp_last")
class ProMSPLast(ProMSP):
    """The reference code's older PRO-MSP: the score after K steps."""

    defaults = {**ProMSP.defaults, "statistic": "last"}


@register_postprocessor("pro_ent_last")
class ProEntropyLast(ProEntropy):
    """The reference code's older PRO-ENT: the score after K steps."""

    defaults = {**ProEntropy.defaults, "statistic": "last"}


@register_postprocessor("pro_msp_t_last")
class ProTemperatureMSPLast(ProTemperatureMSP):
    """The reference code's older PRO-MSP-T (its pro_tempscale): the score after K steps."""

    defaults = {**ProTemperatureMSP.defaults, "statistic": "last"}
