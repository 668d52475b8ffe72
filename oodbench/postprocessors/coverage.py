"""NAC-UE: neuron activation coverage (Liu et al., "Neuron Activation Coverage: Rethinking
Out-of-distribution Detection and Generalization", ICLR 2024; reference code
github.com/BierOne/ood_coverage, also OpenOOD v1.5's ``nac`` postprocessor): ``nac_ue`` on
the penultimate layer from cached outputs, ``nac`` on any layers.

For each neuron n of the penultimate features z (D), with p = softmax(f) and u the uniform
distribution over the C classes, the neuron state is

    s_n = sigmoid(alpha * z_n * g_n),   g = d/dz [ -sum_c u_c log p_c ] = W' (p - u)

(the gradient of KL(u || p) up to a constant, the one GradNorm reads; it factorises through
the classifier, so the cached outputs suffice). The states of a class-balanced subset of
``valid_num`` fit-split samples are counted in M - 1 intervals of the reference's
threshold grid (a log-spaced grid of M points over [0, 1.01] symmetric about 0.5, then
1.2); with t(k, n) the count of neuron n in interval k, the coverage is
c(k, n) = min(t(k, n) / O, 1), and a sample's score is the mean over neurons of the
coverage of the interval its state falls in (0 outside the grid).

Hyperparameters and search lists are the reference's CIFAR-10 ResNet-18 ``avgpool`` layer
(``configs/postprocessors/nac/resnet/nac_cifar10.yml``): O = 50, M = 50, alpha = 100,
valid_num = 1000; the subset takes, per class in order of first appearance, the first
valid_num / C indices of that class after ``numpy.random.RandomState(1).shuffle``, as the
reference's ``TrainSubset`` does. The published NAC-UE (OpenOOD v1.5's leaderboard) also
averages the coverage scores of three intermediate stages (ResNet layer1 to layer3),
whose gradients need the model run again: that is ``nac``.

``nac`` (the full method, OpenOOD's name): the same per layer for every layer of ``layers``
(module names of the backbone, ``<name>:input`` for a module's input; ``penultimate`` is
the classifier's input, where it equals ``nac_ue``), with o and g the layer's output and the
gradient of sum_c -u_c log p_c with respect to it, both *summed* over the spatial positions
(the reference's ``avg_pooling`` sums, and its alpha values assume it), and
s = sigmoid(alpha_l o g). ``O``, ``M`` and
``sig_alpha`` are lists, one value per layer (or one for all); the score is the mean of the
layers' scores. It runs the model forward and backward over the fit subset and every test
image. The defaults are the reference config's (``layer_names: [avgpool]``); the published
CIFAR-10 ResNet-18 setting (its README) is ``layers: [penultimate, layer3, layer2, layer1]``,
``O: [50, 100, 5, 100]``, ``M: [50, 500, 50, 500]``, ``sig_alpha: [100, 1000, 0.001, 0.001]``
(layer names differ by backbone: name them). Its search lists (one value for every layer) are
``nac_ue``'s.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import (Integer, InvalidHyperparameter, ListOf, Number, Outputs, Postprocessor, Text,
                                          in_blocks)
from oodbench.postprocessors.gradient import InputGradientPostprocessor, input_batches
from oodbench.registry import register_postprocessor

PENULTIMATE = "penultimate"


def threshold_grid(points: int) -> torch.Tensor:
    """The reference's ``logspace(1e3, M)``: log_1000 of linspace(1, sqrt(1000), M/2), mirrored
    about 0.5, the top raised by 0.01, then 1.2 appended (M values, float64)."""
    half = np.linspace(1, np.sqrt(1e3), num=points // 2)
    low = np.emath.logn(1e3, half)
    grid = np.concatenate([low[:-1], (1 - low)[::-1]])
    grid[-1] += 1e-2
    return torch.from_numpy(np.append(grid, 1.2))


def balanced_subset(labels: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Per class (in order of first appearance), the first count // classes indices after a
    RandomState(seed) shuffle of that class's indices (at most the smallest class's size)."""
    classes = list(dict.fromkeys(labels.tolist()))
    members = {c: np.flatnonzero(labels == c).tolist() for c in classes}
    per_class = min(count // len(classes), min(len(m) for m in members.values()))
    chosen = []
    for c in classes:
        np.random.RandomState(seed).shuffle(members[c])
        chosen += members[c][:per_class]
    return np.asarray(chosen, dtype=np.int64)


def neuron_states(features: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """sigmoid(alpha z (p - u) W), float32 as the reference computes it."""
    probs = torch.softmax(logits.float(), dim=1)
    gradient = (probs - 1.0 / probs.shape[1]) @ weight.float()
    return torch.sigmoid(alpha * features.float() * gradient)


def intervals(states: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index k of the interval [grid_k, grid_(k+1)) of each state; -1 outside the grid."""
    index = torch.bucketize(states.double(), grid, right=True) - 1
    return torch.where(index >= len(grid) - 1, -1, index)


def interval_counts(states: torch.Tensor, points: int) -> torch.Tensor:
    """(M - 1) x D float64: the count of each neuron's states in each interval."""
    index = intervals(states, threshold_grid(points))
    counts = torch.zeros(points, states.shape[1], dtype=torch.float64)  # row M - 1 gathers "outside"
    counts.scatter_add_(0, torch.where(index < 0, points - 1, index), torch.ones_like(index, dtype=torch.float64))
    return counts[:-1]


def coverage_of(counts: torch.Tensor, minimum: float) -> torch.Tensor:
    """(M - 1) x D: min(`counts` / O, 1)."""
    return (counts / minimum).clamp(max=1.0)


def coverage_table(states: torch.Tensor, points: int, minimum: float) -> torch.Tensor:
    """(M - 1) x D: min(count of each neuron's states in each interval / O, 1)."""
    return coverage_of(interval_counts(states, points), minimum)


def covered(states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over neurons of the coverage of the interval its state falls in."""
    return covered_in(intervals(states, threshold_grid(len(table) + 1)), table)


def covered_in(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`covered` from the states' `intervals`."""
    return torch.where(index >= 0, table.gather(0, index.clamp(min=0)), 0.0).mean(dim=1)


@register_postprocessor("nac_ue")
class NACUE(Postprocessor):
    family = "gradient"
    needs_features = True
    needs_fit = True
    defaults = {"O": 50, "M": 50, "sig_alpha": 100.0, "valid_num": 1000}
    ranges = {"O": Number(gt=0), "M": Integer(ge=4), "sig_alpha": Number(gt=0), "valid_num": Integer(ge=1)}
    # the fit counts the states; O only scales the counts, so a search scores every O from one
    # pass of states and intervals (the same tables, hence the same scores, as one O at a time)
    fit_params = ("M", "sig_alpha", "valid_num")
    grid_params = ("O",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        even_points(self.name, [self.params["M"]])
        keep = torch.from_numpy(balanced_subset(train.labels.numpy(), self.params["valid_num"]))
        states = neuron_states(train.features[keep], train.logits[keep], train.fc[0], self.params["sig_alpha"])
        self.counts = interval_counts(states, self.params["M"])

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.score_grid(outputs, [{}])[0]

    def score_grid(self, outputs: Outputs, combos: list[dict]) -> list[torch.Tensor]:
        tables = [coverage_of(self.counts, {**self.params, **combo}["O"]) for combo in combos]
        alpha, grid = self.params["sig_alpha"], threshold_grid(self.params["M"])

        def block(z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            index = intervals(neuron_states(z, f, outputs.fc[0], alpha), grid)
            return torch.stack([covered_in(index, table) for table in tables], dim=1)

        scores = in_blocks(block, outputs.features, outputs.logits)
        return [scores[:, i] for i in range(len(combos))]


def even_points(name: str, points: list[int]) -> None:
    odd = [m for m in points if m % 2]
    if odd:
        raise InvalidHyperparameter(f"{name}: M={odd[0]} must be even (the threshold grid has M points)")


def layer_states(model: nn.Module, x: torch.Tensor, layers: list[str], alphas: list[float]) -> list[torch.Tensor]:
    """Per layer, N x C states sigmoid(alpha pool(o) pool(g)) of the batch `x`, g the gradient of
    the uniform cross-entropy sum_c -log p_c / C with respect to the layer's output o, pool the
    sum over the spatial positions."""
    from oodbench.models.layers import INPUT_OF, backbone, hooked

    net = backbone(model)
    classifier = next((name for name, m in net.named_modules() if m is getattr(model, "classifier", None)), None)
    names = [f"{classifier}{INPUT_OF}" if layer == PENULTIMATE else layer for layer in layers]
    if PENULTIMATE in layers and classifier is None:
        raise OodbenchError("nac: the penultimate layer is the classifier's input; this model names no classifier")
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:  # the first call of each layer, its graph kept
        captured.setdefault(name, out)

    with torch.enable_grad(), hooked(model, names, keep):
        logits = model(x.detach().requires_grad_(True))
        loss = -(torch.log_softmax(logits, dim=1) / logits.shape[1]).sum()
        grads = torch.autograd.grad(loss, [captured[name] for name in names])
    pool = lambda t: t.flatten(2).sum(dim=2) if t.ndim > 2 else t  # noqa: E731
    return [torch.sigmoid(alpha * pool(captured[name].detach()) * pool(grad)).detach().cpu()
            for name, grad, alpha in zip(names, grads, alphas)]


@register_postprocessor("nac")
class NAC(InputGradientPostprocessor):
    needs_fit = True
    defaults = {"layers": [PENULTIMATE], "O": [50], "M": [50], "sig_alpha": [100.0], "valid_num": 1000}
    ranges = {"layers": ListOf(Text()), "O": ListOf(Number(gt=0)), "M": ListOf(Integer(ge=4)),
              "sig_alpha": ListOf(Number(gt=0)), "valid_num": Integer(ge=1)}

    def per_layer(self, key: str) -> list:
        values, layers = self.params[key], self.params["layers"]
        if len(values) not in (1, len(layers)):
            raise InvalidHyperparameter(f"nac: {key} has {len(values)} values for {len(layers)} layers")
        return values * len(layers) if len(values) == 1 else list(values)

    def fit(self, train: Outputs, val: Outputs) -> None:
        points, minimum = self.per_layer("M"), self.per_layer("O")
        even_points(self.name, points)
        keep = balanced_subset(train.labels.numpy(), self.params["valid_num"])
        subset = Outputs(logits=train.logits[torch.from_numpy(keep)], model=train.model,
                         inputs=Subset(train.inputs, keep.tolist()), meta=train.meta)
        states = [torch.cat(layer) for layer in zip(*(layer_states(train.model, x, self.params["layers"],
                                                                   self.per_layer("sig_alpha"))
                                                      for x in input_batches(subset, self.name)))]
        self.coverage = [coverage_table(s, m, o) for s, m, o in zip(states, points, minimum)]

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        states = layer_states(model, x, self.params["layers"], self.per_layer("sig_alpha"))
        return torch.stack([covered(s, table) for s, table in zip(states, self.coverage)]).mean(dim=0)
