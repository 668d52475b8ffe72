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

``input_std`` (OpenOOD's convention): OpenOOD v1.5 divides the signed gradient by the std of
its per-dataset normalisation table whatever the model's own normalisation, so its step is
eps * std_c / input_std_c on the [0,1] image (std_c the adapter's; the two cancel for a model
normalised with the table's values). None (the default) is the original's rule above.

The gradient depends on T but not on eps, and the clean logits on neither: a validation
search (`ODIN.grid_batch`) runs one clean forward pass, one backward pass per T and one
forward pass per (T, eps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.postprocessors.base import Either, ListOf, Number, OneOf
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.postprocessors.pro import channel_std, max_softmax
from oodbench.registry import register_postprocessor


def odin_step(logits: torch.Tensor, x: torch.Tensor, temperature: float, retain_graph: bool = False) -> torch.Tensor:
    """sign(grad_x CE(f(x)/T, argmax f(x))) with sign(0) = +1 as in ODIN, from the logits
    `logits` = f(x) of a forward pass that recorded its graph from `x`."""
    loss = F.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=retain_graph)
    return torch.where(grad >= 0, 1.0, -1.0)


INPUT_STD = Either(OneOf(None), ListOf(Number(gt=0)))  # the ``input_std`` hyperparameter's range


def table_step(eps: float, table: list[float] | None, model: nn.Module, x: torch.Tensor) -> float | torch.Tensor:
    """The [0,1]-pixel step of a signed-gradient perturbation of size `eps`: `eps` itself
    (`table` None), or the step of a reference that divides the signed gradient of the
    normalised input by `table` (one std per channel) whatever the model's normalisation:
    eps * std_c / table_c, 1 x C x 1 x 1 (OpenOOD v1.5's ODIN and I-ODIN with its
    per-dataset table, its MDS-Ensemble with 0.5 for every channel)."""
    if table is None:
        return eps
    return eps * channel_std(model, x) / torch.tensor(table[: x.shape[1]], dtype=x.dtype, device=x.device).view(
        1, -1, 1, 1)


@register_postprocessor("odin")
class ODIN(InputGradientPostprocessor):
    defaults = {"temperature": 1000.0, "eps": 0.0014, "input_std": None}
    ranges = {"temperature": Number(gt=0), "eps": Number(ge=0), "input_std": INPUT_STD}
    grid_params = ("temperature", "eps")

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.grid_batch(model, x, [self])[0]

    def step_size(self, model: nn.Module, x: torch.Tensor) -> float | torch.Tensor:
        return table_step(float(self.params["eps"]), self.params["input_std"], model, x)

    def grid_batch(self, model: nn.Module, x: torch.Tensor, methods: list["ODIN"]) -> list[torch.Tensor]:
        """max softmax(f(x - eps * step_T) / T) for each method's (T, eps)."""
        temperatures = list(dict.fromkeys(float(method.params["temperature"]) for method in methods))
        with torch.enable_grad():
            x0 = x.detach().requires_grad_(True)
            logits = model(x0)
            steps = {t: odin_step(logits, x0, t, retain_graph=i < len(temperatures) - 1)
                     for i, t in enumerate(temperatures)}
        scores = []
        with torch.no_grad():
            for method in methods:
                temperature = float(method.params["temperature"])
                perturbed = x.detach() - method.step_size(model, x) * steps[temperature]
                scores.append(max_softmax(model(perturbed), temperature))
        return scores
