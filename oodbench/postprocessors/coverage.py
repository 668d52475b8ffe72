"""NAC-UE: neuron activation coverage (Liu et al., "Neuron Activation Coverage: Rethinking
Out-of-distribution Detection and Generalization", ICLR 2024; reference code
github.com/BierOne/ood_coverage, also OpenOOD v1.5's ``nac`` postprocessor), on the
penultimate layer.

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
whose gradients need the model run again; this module implements the penultimate layer only.
"""

from __future__ import annotations

import numpy as np
import torch

from oodbench.postprocessors.base import Integer, InvalidHyperparameter, Number, Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor


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


@register_postprocessor("nac_ue")
class NACUE(Postprocessor):
    family = "gradient"
    needs_features = True
    needs_fit = True
    defaults = {"O": 50, "M": 50, "sig_alpha": 100.0, "valid_num": 1000}
    ranges = {"O": Number(gt=0), "M": Integer(ge=4), "sig_alpha": Number(gt=0), "valid_num": Integer(ge=1)}

    def fit(self, train: Outputs, val: Outputs) -> None:
        points = self.params["M"]
        if points % 2:
            raise InvalidHyperparameter(f"nac_ue: M={points} must be even (the threshold grid has M points)")
        self.grid = threshold_grid(points)
        keep = torch.from_numpy(balanced_subset(train.labels.numpy(), self.params["valid_num"]))
        states = neuron_states(train.features[keep], train.logits[keep], train.fc[0], self.params["sig_alpha"])
        index = intervals(states, self.grid)
        counts = torch.zeros(points, states.shape[1], dtype=torch.float64)  # row M - 1 gathers "outside"
        counts.scatter_add_(0, torch.where(index < 0, points - 1, index), torch.ones_like(index, dtype=torch.float64))
        self.coverage = (counts[:-1] / self.params["O"]).clamp(max=1.0)

    def score(self, outputs: Outputs) -> torch.Tensor:
        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            index = intervals(neuron_states(z, logits, outputs.fc[0], self.params["sig_alpha"]), self.grid)
            covered = self.coverage.gather(0, index.clamp(min=0))
            return torch.where(index >= 0, covered, 0.0).mean(dim=1)

        return in_blocks(block, outputs.features, outputs.logits)
