"""S&I as landed at commit bdf2b90 (oodbench/postprocessors/sni.py), frozen: the whole
network forward and backward for every split layer and step.

The reference that tests/test_sni_split_reuse.py holds the current implementation to
(max abs difference 0), and the baseline that benchmarks/sni_throughput.py times it
against. Not a test module; do not edit to follow sni.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.postprocessors.sni import split_layers


@contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_outputs(model: nn.Module, layers: list[nn.Module],
                  x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    captured: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured[module].append(output.detach().clone())

    with torch.no_grad(), forward_hooks({layer: capture for layer in layers}):
        logits = model(x)
    return [captured[layer][0] for layer in layers], logits


def split_gradient(model: nn.Module, layer: nn.Module, x: torch.Tensor, z: torch.Tensor,
                   target: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    accumulated = None
    for step in range(steps):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad(), forward_hooks({layer: lambda module, inputs, output: z.clone()}):
            logits = model(x)
            last = step == steps - 1
            (grad_max,) = torch.autograd.grad(logits.max(dim=1).values.sum(), z, retain_graph=not last)
            if not last:
                (grad_ce,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), z)
        accumulated = grad_max if accumulated is None else accumulated * grad_max
        if not last:
            z = z.detach() + eta * grad_ce.sign()
    return accumulated


def nonzero_fractions(gradient: torch.Tensor) -> torch.Tensor:
    nonzero = (gradient != 0).float()
    return nonzero.flatten(2).mean(dim=2) if nonzero.dim() > 2 else nonzero


def landed_sni_score_batch(model: nn.Module, x: torch.Tensor, eta: float = 0.001, steps: int = 2,
                           layers: list[str] | str | None = None) -> torch.Tensor:
    """The landed ``SplittingIntegrating.score_batch``: one score per image of `x`."""
    chosen = split_layers(model, layers)
    clean, logits = layer_outputs(model, chosen, x)
    target = logits.argmax(dim=1)
    fractions = [nonzero_fractions(split_gradient(model, layer, x, z, target, eta, steps))
                 for layer, z in zip(chosen, clean)]
    return -torch.cat(fractions, dim=1).pow(2).mean(dim=1)
