"""Intermediate feature maps of any model, through forward hooks on its layers.

Methods that read more than the penultimate features (GRAM, MDS-Ensemble, RankFeat) name
the layers they read and what they reduce each layer's output to; nothing here knows an
architecture. Layers are module names of the backbone (``net.named_modules()`` of the
adapter's network), or a rule:

- ``"stages"``: the feature-map stages of the network. Among the module calls of one
  forward pass that return an N x C x H x W map, the module that returns *last* with
  each distinct (C, H, W), in the order they return. A ResNet gives its stages
  (``layer1`` .. ``layer4``) and the pooled 1 x 1 map; the digits CNN its ReLUs and max-pool.
- ``"stem"``: what the network computes before its first block: the input of the first
  stage that is a container module (``<name>:input``), or that stage's output when no layer
  runs before it. A CIFAR ResNet's relu(bn1(conv1(x))) (whether that ReLU is a module or a
  function call), an ImageNet ResNet's maxpool output, a LeNet's first conv block: the
  first entry of OpenOOD's ``return_feature_list`` for its ResNets and LeNet (MDS-Ensemble's
  default layer there).
- ``"conv_relu"``: every ``nn.Conv2d`` and ``nn.ReLU`` module (GRAM's choice in OpenOOD).

A module name with the suffix ``:input`` reads that module's input (its first argument)
instead of its output.

Every call of a chosen module counts (in the order calls return), so a module called
twice contributes two maps.

`LayerStatistic` is a per-sample statistic of chosen layers (a reduction of each map to
N x K, computed inside the hook, so a later in-place change of the map does not matter).
`extract_statistics` computes statistics over a dataset in one forward pass; the runner
caches them per (model, split) under a key naming the statistic
(`oodbench.identity.layer_key_text`) and hands them to methods in ``outputs.extras``;
`statistic` reads them there, or computes them when the outputs carry the model and
images (the Python API, tests), or fails in one line (`MissingExtras`).

Reductions (`REDUCTIONS`), for a map F of N x C x (any spatial shape):

- ``mean``: per-channel mean over the spatial positions, N x C;
- ``mean_var``: channel means then channel variances (unbiased), N x 2C; a map with one
  position gives the means only (OpenOOD's ``stat`` feature type);
- ``gram`` with powers (p_1 .. p_P): for each p, g_c = sum_d sum_s F_cs^p F_ds^p (the row
  sums of the p-th order Gram matrix) taken to sign(g) |g|^(1/p), in float64; N x (P C).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from oodbench.errors import MissingExtras, OodbenchError, did_you_mean

RULES = ("stages", "stem", "conv_relu")
INPUT_OF = ":input"  # <module name>:input reads the module's input
EXTRA_PREFIX = "layer:"


def channel_mean(fmap: torch.Tensor, args: tuple = ()) -> torch.Tensor:
    return fmap.flatten(2).mean(dim=2) if fmap.ndim > 2 else fmap


def channel_mean_var(fmap: torch.Tensor, args: tuple = ()) -> torch.Tensor:
    flat = fmap.flatten(2) if fmap.ndim > 2 else fmap.unsqueeze(2)
    if flat.shape[2] == 1:
        return flat[:, :, 0]
    return torch.cat([flat.mean(dim=2), flat.var(dim=2)], dim=1)


def gram_rows(fmap: torch.Tensor, powers: tuple = (1,)) -> torch.Tensor:
    flat = fmap.detach().double().reshape(fmap.shape[0], fmap.shape[1], -1)
    parts = []
    for p in powers:
        raised = flat ** p
        rows = (raised @ raised.sum(dim=1).unsqueeze(2)).squeeze(2)  # sum_d (F^p F^p')_cd
        parts.append(rows.sign() * rows.abs() ** (1.0 / p))
    return torch.cat(parts, dim=1)


REDUCTIONS: dict[str, Callable[[torch.Tensor, tuple], torch.Tensor]] = {
    "mean": channel_mean, "mean_var": channel_mean_var, "gram": gram_rows}


@dataclass(frozen=True)
class LayerStatistic:
    """One per-sample statistic of chosen layers: `reduce` (a key of `REDUCTIONS`) with
    `args`, of the layers `layers` (a rule of `RULES` or module names)."""

    reduce: str
    layers: str | tuple[str, ...] = "stages"
    args: tuple = ()

    @property
    def key(self) -> str:
        """The statistic's name in cache keys and in ``outputs.extras``."""
        layers = self.layers if isinstance(self.layers, str) else ",".join(self.layers)
        return f"{self.reduce}{list(self.args) if self.args else ''}@{layers}"


def backbone(model: nn.Module) -> nn.Module:
    """The network whose modules are named: the adapter's ``net``, or the model itself."""
    return getattr(model, "net", model)


_RESOLVED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def layer_names(model: nn.Module, layers: str | Sequence[str], x: torch.Tensor) -> list[str]:
    """The module names `layers` selects on inputs shaped like `x` (rules are resolved with
    one forward pass, remembered per model and input shape)."""
    net = backbone(model)
    modules = dict(net.named_modules())
    if not isinstance(layers, str):
        for name in layers:
            if name.removesuffix(INPUT_OF) not in modules:
                raise OodbenchError(f"the model has no layer named '{name}'{did_you_mean(name, modules)}")
        return list(layers)
    if layers == "conv_relu":
        return [name for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.ReLU))]
    if layers not in ("stages", "stem"):
        raise OodbenchError(f"unknown layer rule '{layers}'; rules: {', '.join(RULES)}, or a list of layer names")
    return [name for name, _ in stages(model, x)] if layers == "stages" else [stem(model, x)]


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, tuple]], dict[str, int]]:
    """One forward pass on inputs shaped like `x`, remembered per model and input shape: the
    (name, (C, H, W)) of every feature map a module returns, in return order, and per module
    how many maps had returned when it was first called."""
    net = backbone(model)
    memo = _RESOLVED.setdefault(net, {})
    shape = tuple(x.shape[1:])
    if shape not in memo:
        returned: list[tuple[str, tuple]] = []
        started: dict[str, int] = {}
        handles = []

        def on_start(name: str) -> None:  # a pre-hook's return value would replace the input
            started.setdefault(name, len(returned))

        for name, m in net.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(lambda m, args, name=name: on_start(name)))
                handles.append(m.register_forward_hook(
                    lambda m, i, out, name=name: returned.append((name, tuple(out.shape[1:])))
                    if isinstance(out, torch.Tensor) and out.ndim == 4 else None))
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            for handle in handles:
                handle.remove()
        memo[shape] = (returned, started)
    return memo[shape]


def stages(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, (C, H, W)) of the feature-map stages (rule ``stages``) on inputs shaped like `x`."""
    returned, _ = _trace(model, x)
    last = {map_shape: (order, name) for order, (name, map_shape) in enumerate(returned)}
    found = [(name, map_shape) for map_shape, (_, name) in sorted(last.items(), key=lambda kv: kv[1][0])]
    if not found:
        raise OodbenchError("the model has no layer with a feature-map (N x C x H x W) output; name its layers")
    return found


def stem(model: nn.Module, x: torch.Tensor) -> str:
    """The layer name of rule ``stem`` on inputs shaped like `x`. Raises OodbenchError when no
    stage is a container module."""
    modules = dict(backbone(model).named_modules())
    first = next((name for name, _ in stages(model, x) if any(True for _ in modules[name].children())), None)
    if first is None:
        raise OodbenchError("the model has no stage made of layers (a block); name the stem's layer")
    return first + INPUT_OF if _trace(model, x)[1][first] else first


@contextmanager
def hooked(model: nn.Module, names: Sequence[str], on_output: Callable[[str, torch.Tensor], torch.Tensor | None]
           ) -> Iterator[None]:
    """Forward hooks on the named modules of the backbone: ``on_output(name, output)`` on every
    call; a tensor it returns replaces the module's output (a generic split of the network).
    For a name ``<module>:input`` it gets (and may replace) the module's first input."""
    modules = dict(backbone(model).named_modules())

    def on_input(name: str, args: tuple) -> tuple | None:
        replaced = on_output(name, args[0])
        return None if replaced is None else (replaced, *args[1:])

    handles = [modules[name.removesuffix(INPUT_OF)].register_forward_pre_hook(
                   lambda m, args, name=name: on_input(name, args)) if name.endswith(INPUT_OF)
               else modules[name].register_forward_hook(lambda m, i, out, name=name: on_output(name, out))
               for name in dict.fromkeys(names)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_statistics(model: nn.Module, x: torch.Tensor, statistics: Sequence[LayerStatistic]
                       ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """(logits, per statistic the list of its layers' N x K values) of one forward pass of `x`;
    differentiable when called under grad (the reductions but ``gram`` are)."""
    chosen = [layer_names(model, s.layers, x) for s in statistics]
    values: list[list[torch.Tensor]] = [[] for _ in statistics]

    def on_output(name: str, out: torch.Tensor) -> None:
        for index, (stat, names) in enumerate(zip(statistics, chosen)):
            if name in names:
                values[index].append(REDUCTIONS[stat.reduce](out, stat.args))

    with hooked(model, [n for names in chosen for n in names], on_output):
        logits = model(x)
    return logits, values


@torch.no_grad()
def extract_statistics(model: nn.Module, dataset, statistics: Sequence[LayerStatistic], batch_size: int = 256,
                       num_workers: int = 0, device: str | torch.device = "cpu") -> dict[str, list[torch.Tensor]]:
    """``{statistic.key: [N x K per layer call, float32 on the CPU]}`` over `dataset` ([0,1]
    images), one forward pass for all statistics."""
    chunks: list[list[list[torch.Tensor]]] = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        _, values = forward_statistics(model, images.to(device), statistics)
        chunks.append([[v.float().cpu() for v in layer_values] for layer_values in values])
    result = {}
    for index, stat in enumerate(statistics):
        per_layer = list(zip(*(chunk[index] for chunk in chunks)))
        result[stat.key] = [torch.cat(parts) for parts in per_layer]
    return result


def as_extras(key: str, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A statistic's layers as ``outputs.extras`` entries (``layer:<key>#<i>``)."""
    return {f"{EXTRA_PREFIX}{key}#{i}": value for i, value in enumerate(values)}


def statistic(outputs, stat: LayerStatistic, method: str) -> list[torch.Tensor]:
    """The N x K values of `stat` per layer for `outputs`: from ``outputs.extras`` (cached by the
    runner), else computed from ``outputs.model`` and ``outputs.inputs`` (and kept in extras)."""
    prefix = f"{EXTRA_PREFIX}{stat.key}#"
    found = {int(name[len(prefix):]): value for name, value in outputs.extras.items() if name.startswith(prefix)}
    if found:
        return [found[i].float() for i in range(len(found))]
    if outputs.model is None or outputs.inputs is None:
        raise MissingExtras(f"postprocessor '{method}' needs the layer statistic {stat.key}; run it through "
                            "oodbench (which extracts and caches it) or give outputs.model and outputs.inputs")
    device = next(iter([*outputs.model.parameters(), *outputs.model.buffers()]), torch.empty(0)).device
    values = extract_statistics(outputs.model, outputs.inputs, [stat], int(outputs.meta.get("batch_size", 256)),
                                0, device)[stat.key]
    outputs.extras.update(as_extras(stat.key, values))
    return values
