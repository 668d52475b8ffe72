"""Shared plumbing of the postprocessors that differentiate through the model (ODIN, PRO, S&I).

They cannot work from cached outputs: `InputGradientPostprocessor.score` runs the model
again over ``outputs.inputs`` ([0,1] images), whole batches of
``outputs.meta["batch_size"]`` at a time (memory is bounded by the batch size), on the
device the model lives on, and hands each batch to ``score_batch(model, x)``.

Model parameters stay frozen: every gradient is taken with ``torch.autograd.grad`` with
respect to the input (or an intermediate activation) only, so nothing accumulates in a
parameter's ``.grad``. The model is in eval mode, so the samples of a batch do not
interact and the gradient of the batch's summed objective is each sample's own gradient:
batched scores equal one-at-a-time scores.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs, Postprocessor

DEFAULT_BATCH_SIZE = 256


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def input_gradient(objective: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective(x), d objective(x)_i / d x_i): one forward and one backward pass.

    `objective` maps a batch to one value per sample; the gradient of their sum is taken
    with respect to `x` alone."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def input_batches(outputs: Outputs, method: str) -> Iterator[torch.Tensor]:
    """The [0,1] images of `outputs.inputs`, batch by batch, on the model's device."""
    if outputs.model is None or outputs.inputs is None:
        raise OodbenchError(f"{method} runs the model again: it needs outputs.model and outputs.inputs")
    if len(outputs.inputs) != len(outputs):
        raise OodbenchError(f"{method}: {len(outputs.inputs)} input images for {len(outputs)} cached outputs")
    device = model_device(outputs.model)
    batch_size = int(outputs.meta.get("batch_size", DEFAULT_BATCH_SIZE))
    for images, _ in DataLoader(outputs.inputs, batch_size=batch_size, shuffle=False):
        yield images.to(device)


class InputGradientPostprocessor(Postprocessor):
    """Base class of methods that need input gradients: implement ``score_batch``."""

    needs_model = True
    family = "gradient"

    def score(self, outputs: Outputs) -> torch.Tensor:
        model = outputs.model
        return torch.cat([self.score_batch(model, x).detach().cpu()
                          for x in input_batches(outputs, self.name)])

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One score per image of the batch `x` ([0,1] images on the model's device)."""
        raise NotImplementedError
