"""S&I, Splitting & Integrating (Zhang et al., "Splitting & Integrating: Out-of-Distribution
Detection via Adversarial Gradient Attribution", ICML 2025).

The network is split at each chosen intermediate layer l: z = head_l(x) is that
layer's output and the logits are tail_l(z). With y = argmax f(x) and z_1 = z:

    for t = 1..T:  g_t = grad_z max_c tail_l(z_t)_c
                   z_{t+1} = z_t + eta * sign(grad_z CE(tail_l(z_t), y))
    G = g_1 * g_2 * ... * g_T          (accumulated as in the reference code, so an entry
                                        counts when its gradient is non-zero at every step)
    r_lc = share of the H x W entries of channel c where G != 0

The OOD score is the mean of r_lc^2 over every channel of every chosen layer (larger =
more OOD); the harness score is its negative. Defaults: eta = 0.001 (in the units of
the layer's activations), T = 2.

The reference code writes head/tail pairs by hand for each architecture; here the split
is generic, for any model: tail_l(z) is the model's forward with layer l's output
replaced by z, everything else (skip connections included) computed from x as usual.
Default layers: the outputs of every BatchNorm/GroupNorm layer; ``layers`` names others
(names as in ``net.named_modules()`` of the backbone). Each chosen layer must run once
per forward. (The reference ResNet-34 splits are the 35 non-stem BatchNorm outputs plus
the stem convolution's output, taken before its BatchNorm; name the layers to reproduce
that.)

What it costs per batch, for L layers and T steps (the whole network per layer and step
would be L * T forward and L * (2T - 1) backward passes):

- step 1 of every layer at once: at z_1 every tail_l(z_1) is the clean network, so one
  forward pass of the unchanged model and two backward passes give g_1 and the CE
  gradient at every layer's output (tensor hooks registered when the layer returns, so
  they see the gradient at that value even if it is changed in place later);
- steps 2..T, L times: only the tail runs. The clean pass records every module call in
  order (`CallTrace`); a tail pass (`TailReplay`) hands back, instead of running it, every
  call that ended before layer l started, and returns z for layer l itself, so the head
  is not computed again. Functional operations between modules (an activation written as
  ``F.relu``, the adapter's input normalisation) do run again; they are cheap.

The scores are the same, bit for bit, as running the whole network for every layer and
step (tests/sni_landed.py): the head's values are the ones the clean pass computed, and
the backward pass visits the tail's nodes in the same order either way (autograd runs
them in reverse creation order). A call is handed back only if it left its inputs
unchanged and nothing changed its output in place later (tensor version counters), so
in-place code (``ReLU(inplace=True)``, ``out += identity``) still runs. A layer whose
output shares memory with its input (an identity, a view) and is changed in place later
is the one case where replacing the output by z differs from the clean network: its
step 1 runs the tail too. Modules are assumed to be functions of their inputs (no state
changed by a forward pass, as in eval mode).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import ModelAdapter
from oodbench.postprocessors.base import Either, Integer, ListOf, Number, OneOf, Text
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.registry import register_postprocessor

NORMALIZATION_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)

Dispatch = Callable[[nn.Module, Callable, tuple, dict], Any]


def split_layers(model: nn.Module, names: list[str] | str | None = None) -> list[nn.Module]:
    """The named layers of the backbone, or by default its normalisation layers."""
    backbone = model.net if isinstance(model, ModelAdapter) else model
    modules = dict(backbone.named_modules())
    if names is None:
        layers = [m for m in modules.values() if isinstance(m, NORMALIZATION_LAYERS)]
        if not layers:
            raise OodbenchError("sni: the model has no BatchNorm/GroupNorm layer; name layers with 'layers'")
        return layers
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in modules:
            raise OodbenchError(f"sni: the model has no layer named '{name}'{did_you_mean(name, modules)}")
    return [modules[name] for name in names]


@contextmanager
def routed_calls(model: nn.Module, dispatch: Dispatch) -> Iterator[None]:
    """Route every call of every module of `model` through ``dispatch(module, forward, args, kwargs)``,
    which may run ``forward`` or return something else instead."""
    modules = list(model.modules())
    own_forwards = [module.__dict__.get("forward") for module in modules]

    def routed(module: nn.Module, forward: Callable) -> Callable:
        return lambda *args, **kwargs: dispatch(module, forward, args, kwargs)

    for module in modules:
        module.forward = routed(module, module.forward)
    try:
        yield
    finally:
        for module, own in zip(modules, own_forwards):
            if own is None:
                del module.forward
            else:
                module.forward = own


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in `value`, looking into lists, tuples and dicts (DenseNet passes a list)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


@dataclass
class ModuleCall:
    """One module call of a forward pass, numbered in the order calls start."""

    module: nn.Module
    end: int  # how many calls had started when it returned: its number + 1 + its descendants
    keeps_inputs: bool  # it changed none of its tensor arguments in place
    output: torch.Tensor | None = None  # its output, while it can be handed back
    output_version: int = 0


class CallTrace:
    """Dispatch of the clean forward pass, which runs the model unchanged: numbers every
    module call, keeps the outputs that a tail pass may hand back, and at each split layer
    keeps a copy of its output (z_1) and hooks the gradient at that output (the value it
    had when the layer returned, even if changed in place later)."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = set(layers)
        self.calls: list[ModuleCall] = []
        self.split_index: dict[nn.Module, list[int]] = {layer: [] for layer in layers}
        self.clean: dict[nn.Module, torch.Tensor] = {}
        self.aliased: set[nn.Module] = set()
        self.gradients: dict[nn.Module, torch.Tensor] = {}
        self._aliases: list[tuple[nn.Module, torch.Tensor, int]] = []

    def __call__(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        index = len(self.calls)
        self.calls.append(None)
        inputs = list(_tensors((args, kwargs)))
        versions = [tensor._version for tensor in inputs]
        output = forward(*args, **kwargs)
        keeps_inputs = all(tensor._version == version for tensor, version in zip(inputs, versions))
        call = self.calls[index] = ModuleCall(module, len(self.calls), keeps_inputs)
        if module in self.layers:
            self._split(module, index, output, inputs)
        if keeps_inputs and isinstance(output, torch.Tensor):
            call.output, call.output_version = output.detach(), output._version
        return output

    def _split(self, layer: nn.Module, index: int, output: Any, inputs: list[torch.Tensor]) -> None:
        if not isinstance(output, torch.Tensor):
            raise OodbenchError(f"sni: layer {type(layer).__name__} does not output a tensor")
        if not output.requires_grad:
            raise OodbenchError(f"sni: the output of layer {type(layer).__name__} does not depend on the "
                                "input differentiably; choose another layer")
        self.split_index[layer].append(index)
        self.clean[layer] = output.detach().clone()
        output.register_hook(lambda grad: self.gradients.__setitem__(layer, grad))
        storage = output.untyped_storage().data_ptr()
        if output._base is not None or any(t.untyped_storage().data_ptr() == storage for t in inputs):
            self._aliases.append((layer, output, output._version))

    def finish(self) -> None:
        """Check each split layer ran once; find the layers whose output aliases a tensor
        changed in place later (replacing such an output by z is not the same as changing
        its value in the graph: their first step runs the tail too); drop the outputs no
        tail pass hands back."""
        for layer, indices in self.split_index.items():
            if len(indices) != 1:
                raise OodbenchError(f"sni: layer {type(layer).__name__} runs {len(indices)} times per forward; "
                                    "split layers must run once")
        self.aliased = {layer for layer, output, version in self._aliases if output._version != version}
        self._aliases = []
        for call in self.calls:
            if call.output is not None and call.output._version != call.output_version:
                call.output = None  # changed in place after the call: later code may rely on that
        handed_back = {i for layer in self.layers for i in self.handed_back_before(self.split_index[layer][0])}
        for index, call in enumerate(self.calls):
            if index not in handed_back:
                call.output = None

    def layer_gradients(self, objective: torch.Tensor, x: torch.Tensor, retain_graph: bool) -> dict:
        """The gradient of `objective` at every split layer's output, from one backward pass."""
        self.gradients = {}
        torch.autograd.grad(objective, x, retain_graph=retain_graph, allow_unused=True)
        missing = [type(layer).__name__ for layer in self.layers if layer not in self.gradients]
        if missing:
            raise OodbenchError(f"sni: the logits do not depend on the output of layer(s) {', '.join(missing)}")
        return self.gradients

    def handed_back_before(self, split: int) -> Iterator[int]:
        """The calls a tail pass from call `split` hands back: the outermost calls that
        ended before it started and can be handed back."""
        index = 0
        while index < split:
            call = self.calls[index]
            if call.end <= split and call.output is not None:
                yield index
                index = call.end
            else:
                index += 1


class TailReplay:
    """Dispatch of a tail pass from split layer call `split`, whose output becomes `z`."""

    def __init__(self, trace: CallTrace, split: int, z: torch.Tensor):
        self.calls, self.split, self.z = trace.calls, split, z
        self.next = 0

    def __call__(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        index = self.next
        self.next += 1
        if index > self.split:
            return forward(*args, **kwargs)
        call = self.calls[index]
        if call.module is not module:
            raise OodbenchError("sni: the model called its modules in a different order than in the clean "
                                "pass; S&I needs the same module calls up to each split layer")
        if index == self.split:
            if call.keeps_inputs:
                self.next = call.end
            else:  # its in-place change of an input is part of the forward pass
                forward(*args, **kwargs)
            return self.z.clone()
        if call.end <= self.split and call.output is not None:
            self.next = call.end
            return call.output.clone()
        return forward(*args, **kwargs)


def first_step(model: nn.Module, layers: list[nn.Module], x: torch.Tensor,
               steps: int) -> tuple[CallTrace, torch.Tensor, dict[nn.Module, tuple]]:
    """One clean pass: its trace, the argmax targets, and per layer (grad of the max logit,
    grad of the CE or None when `steps` is 1) at the layer's output."""
    trace = CallTrace(layers)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with routed_calls(model, trace):
            logits = model(x)
        trace.finish()
        target = logits.argmax(dim=1)
        grad_max = trace.layer_gradients(logits.max(dim=1).values.sum(), x, retain_graph=steps > 1)
        grad_ce = (trace.layer_gradients(F.cross_entropy(logits, target, reduction="sum"), x, retain_graph=False)
                   if steps > 1 else {})
    return trace, target, {layer: (grad_max[layer], grad_ce.get(layer)) for layer in layers}


def split_gradient(model: nn.Module, trace: CallTrace, layer: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   eta: float, steps: int, first: tuple | None = None) -> torch.Tensor:
    """G for one layer: the product over the T steps of grad_z max logit of tail(z), z moving
    up the CE. `first`: step 1's two gradients, when `first_step` could take them; every
    other step runs the tail alone (`TailReplay`)."""
    split = trace.split_index[layer][0]
    z = trace.clean[layer]
    accumulated = None
    for step in range(steps):
        last = step == steps - 1
        if step == 0 and first is not None:
            grad_max, grad_ce = first
        else:
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                with routed_calls(model, TailReplay(trace, split, z)):
                    logits = model(x)
                (grad_max,) = torch.autograd.grad(logits.max(dim=1).values.sum(), z, retain_graph=not last)
                if not last:
                    (grad_ce,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), z)
        accumulated = grad_max if accumulated is None else accumulated * grad_max
        if not last:
            z = z.detach() + eta * grad_ce.sign()
    return accumulated


def nonzero_fractions(gradient: torch.Tensor) -> torch.Tensor:
    """B x C: per channel, the share of its spatial entries that are non-zero."""
    nonzero = (gradient != 0).float()
    return nonzero.flatten(2).mean(dim=2) if nonzero.dim() > 2 else nonzero


@register_postprocessor("sni", "splitting_integrating")
class SplittingIntegrating(InputGradientPostprocessor):
    defaults = {"eta": 0.001, "steps": 2, "layers": None}
    ranges = {"eta": Number(ge=0), "steps": Integer(ge=1), "layers": Either(OneOf(None), Text(), ListOf(Text()))}

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layers = split_layers(model, self.params["layers"])
        eta, steps = float(self.params["eta"]), self.params["steps"]
        trace, target, first = first_step(model, layers, x, steps)
        fractions = [nonzero_fractions(split_gradient(model, trace, layer, x, target, eta, steps,
                                                      None if layer in trace.aliased else first[layer]))
                     for layer in layers]
        return -torch.cat(fractions, dim=1).pow(2).mean(dim=1)
