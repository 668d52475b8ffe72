"""Shared plumbing of the postprocessors that differentiate through the model (ODIN, PRO, S&I).

They cannot work from cached outputs: `InputGradientPostprocessor.score_grid` runs the
model again over ``outputs.inputs`` ([0,1] images), whole batches of
``outputs.meta["batch_size"]`` at a time (memory is bounded by the batch size), on the
device the model lives on, and hands each batch to ``grid_batch(model, x, methods)``,
which scores it under every combination of a search at once (by default each method's
``score_batch(model, x)``); ``score`` is the grid of one combination, so the two agree
exactly. The scores of a batch come back to the host once, after all its steps: nothing
inside a method's step loop waits for the device. ``outputs.meta["progress"]``, when set,
is called with the number of images after each batch (the runner's per-cell bar).

Model parameters stay frozen: every gradient is taken with ``torch.autograd.grad`` with
respect to the input (or an intermediate activation) only, so nothing accumulates in a
parameter's ``.grad``. The model is in eval mode, so the samples of a batch do not
interact and the gradient of the batch's summed objective is each sample's own gradient:
batched scores equal one-at-a-time scores.
"""

from __future__ import annotations

from typing import Any, Iterator

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


def input_batches(outputs: Outputs, method: str) -> Iterator[torch.Tensor]:
    """The [0,1] images of `outputs.inputs`, batch by batch, on the model's device (decoded by
    ``outputs.meta["num_workers"]`` worker processes, pinned for a CUDA device)."""
    if outputs.model is None or outputs.inputs is None:
        raise OodbenchError(f"{method} runs the model again: it needs outputs.model and outputs.inputs")
    if len(outputs.inputs) != len(outputs):
        raise OodbenchError(f"{method}: {len(outputs.inputs)} input images for {len(outputs)} cached outputs")
    device = model_device(outputs.model)
    batch_size = int(outputs.meta.get("batch_size", DEFAULT_BATCH_SIZE))
    workers = int(outputs.meta.get("num_workers", 0))
    progress = outputs.meta.get("progress")
    loader = DataLoader(outputs.inputs, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for images, _ in loader:
        yield images.to(device, non_blocking=True)
        if progress is not None:
            progress(len(images))


class InputGradientPostprocessor(Postprocessor):
    """Base class of methods that need input gradients: implement ``score_batch`` (and
    ``grid_batch`` when the combinations of a search share work)."""

    needs_model = True
    family = "gradient"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.score_grid(outputs, [{}])[0]

    def score_grid(self, outputs: Outputs, combos: list[dict[str, Any]]) -> list[torch.Tensor]:
        """One pass over the images for every combination: each batch is decoded and moved to
        the device once, scored under all of them, and its scores come back to the host once."""
        methods = [self.with_params(combo) for combo in combos]
        batches = [torch.stack(self.grid_batch(outputs.model, x, methods)).detach().cpu()
                   for x in input_batches(outputs, self.name)]
        if not batches:
            return [torch.empty(0) for _ in methods]
        return list(torch.cat(batches, dim=1))

    def grid_batch(self, model: nn.Module, x: torch.Tensor, methods: list["InputGradientPostprocessor"]
                   ) -> list[torch.Tensor]:
        """The scores of the batch `x` under each of `methods` (this class, other hyperparameters)."""
        return [method.score_batch(model, x) for method in methods]

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One score per image of the batch `x` ([0,1] images on the model's device)."""
        raise NotImplementedError
