"""I-ODIN, ODIN with a one-entry perturbation (Regmi et al., the ASCOOD paper, arXiv 2025,
github.com/sudarshanregmi/ASCOOD; OpenOOD v1.5's ``iodin``).

As ODIN (`oodbench.postprocessors.odin`), but only the single input entry (one channel of
one pixel) with the largest gradient magnitude moves:

    y = argmax f(x),  g = grad_x CE(f(x) / T, y)
    j = argmax_j |g_j| * std_c(j)          (the magnitude of the gradient on normalised inputs)
    x' = x - eps * sign(g_j) e_j           (sign(0) = +1)
    score(x) = max softmax(f(x') / T)

eps is in [0,1]-pixel units, as ODIN's: the reference code steps the normalised input by
eps * sign / std_c, which is eps in pixels. ``input_std`` is ODIN's (OpenOOD's convention):
OpenOOD's I-ODIN inherits ODIN's per-dataset table std and divides its signed gradient by
it whatever the model's normalisation, a step of eps * std_c / input_std_c in pixels
(`oodbench.postprocessors.odin.table_step`); None (the default) is the rule above.

The entry is chosen by the magnitude of the gradient with respect to the *normalised* input
(|g| * std_c), as the reference code computes it on normalised inputs; for a model without
input normalisation std_c = 1.
For models that output probabilities f = log p.

Differences from OpenOOD's ``iodin_postprocessor.py``: none in the formula (with its
``input_std`` from the ``openood`` profile); the gradient depends on T but not on eps, so a
search runs one backward pass per T (`grid_batch`).

Measured on ../shared's CIFAR-10 ResNet-56 (300 ID test and 300 TIN images, OpenOOD's
input_std set to the model's): OpenOOD's own code gives the same scores to 2.2e-7 (relative).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.postprocessors.base import Number
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.postprocessors.odin import INPUT_STD, table_step
from oodbench.postprocessors.pro import channel_std, max_softmax
from oodbench.registry import register_postprocessor


def one_entry_step(grad: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """sign(g_j) e_j (sign(0) = +1) at each sample's entry of largest |g| * std_c, zero elsewhere."""
    flat = (grad.abs() * std).flatten(1)
    mask = torch.zeros_like(flat).scatter_(1, flat.argmax(dim=1, keepdim=True), 1.0).reshape(grad.shape)
    return torch.where(grad >= 0, 1.0, -1.0) * mask


@register_postprocessor("iodin")
class IODIN(InputGradientPostprocessor):
    defaults = {"temperature": 1000.0, "eps": 0.0014, "input_std": None}
    ranges = {"temperature": Number(gt=0), "eps": Number(ge=0), "input_std": INPUT_STD}
    grid_params = ("temperature", "eps")

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.grid_batch(model, x, [self])[0]

    def grid_batch(self, model: nn.Module, x: torch.Tensor, methods: list["IODIN"]) -> list[torch.Tensor]:
        """max softmax(f(x - eps * step_T) / T) for each method's (T, eps)."""
        temperatures = list(dict.fromkeys(float(m.params["temperature"]) for m in methods))
        std = channel_std(model, x)
        steps = {}
        with torch.enable_grad():
            x0 = x.detach().requires_grad_(True)
            logits = model(x0)
            for i, t in enumerate(temperatures):
                loss = F.cross_entropy(logits / t, logits.argmax(dim=1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, x0, retain_graph=i < len(temperatures) - 1)
                steps[t] = one_entry_step(grad, std)
        with torch.no_grad():
            return [max_softmax(model(x.detach() - table_step(float(m.params["eps"]), m.params["input_std"], model, x)
                                      * steps[float(m.params["temperature"])]), float(m.params["temperature"]))
                    for m in methods]
