"""ODIN (Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image
Detection in Neural Networks", ICLR 2018): temperature scaling and input preprocessing.

    y = argmax f(x)
    x' = x - eps * sign(grad_x CE(f(x) / T, y))
    score(x) = max softmax(f(x') / T)

**Units of eps.** The original code perturbs the *normalised* image x_n = (x - mean) / std
by eps * sign(grad_{x_n}) / std_c, i.e. the signed gradient divided by the channel std.
In [0,1]-pixel units that step is exactly eps * sign(grad_x), because x = std_c * x_n +
mean and grad_x has the sign of grad_{x_n}. oodbench adapters take [0,1] images and
normalise inside, so the step above is taken on the [0,1] image and eps is in
[0,1]-pixel units: eps = 0.0014 is the original's 0.0014, for every model.

As in the original, the sign of a zero gradient entry counts as +1 (``grad >= 0``), so
every pixel moves by eps. For models that output probabilities f = log p.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.postprocessors.base import Number
from oodbench.postprocessors.gradient import InputGradientPostprocessor, input_gradient
from oodbench.postprocessors.pro import max_softmax
from oodbench.registry import register_postprocessor


def odin_perturbation(model: nn.Module, x: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    """x - eps * sign(grad_x CE(f(x)/T, argmax f(x))), with sign(0) = +1 as in ODIN."""

    def cross_entropy(v: torch.Tensor) -> torch.Tensor:
        logits = model(v)
        return F.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="none")

    _, grad = input_gradient(cross_entropy, x)
    return x.detach() - eps * torch.where(grad >= 0, 1.0, -1.0)


@register_postprocessor("odin")
class ODIN(InputGradientPostprocessor):
    defaults = {"temperature": 1000.0, "eps": 0.0014}
    ranges = {"temperature": Number(gt=0), "eps": Number(ge=0)}

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        temperature = float(self.params["temperature"])
        perturbed = odin_perturbation(model, x, temperature, float(self.params["eps"]))
        with torch.no_grad():
            return max_softmax(model(perturbed), temperature)
