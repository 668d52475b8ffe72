"""MDS-Ensemble, the multi-layer Mahalanobis detector (Lee, Lee, Lee & Shin, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
NeurIPS 2018).

For each chosen layer l, the feature map is reduced to per-channel means (``feature:
mean``; ``mean_var`` adds the channel variances, OpenOOD's ``stat``), z_l(x). Fit on the
ID fit split: class means mu_lc and one tied covariance S_l per layer (pseudo-inverse
P_l), as `oodbench.postprocessors.distance`. With M_l(x, c) = -1/2 (z_l - mu_lc)' P_l (z_l - mu_lc):

    c* = argmax_c M_l(x, c)
    x' = x - noise * sign(grad_x [-M_l(x, c*)])       (sign(0) = +1)
    score(x) = sum_l alpha_l * max_c M_l(x', c)

``noise`` is in [0,1]-pixel units, like ODIN's eps: the reference code divides the signed
gradient by each channel's std on normalised inputs, which is this step. ``input_std``
(OpenOOD's convention, as ODIN's): the reference divides the signed gradient by these
values instead, whatever the model's normalisation, a step of noise * std_c / input_std_c
in pixels (`oodbench.postprocessors.odin.table_step`); None (the default) is the step
above. ``noise = 0`` scores the unperturbed features (from the cache, without running the
model). ``alpha``: one weight per layer (None: 1 each).

Layers: ``stages`` (default; every feature-map stage of the network, the paper's
ensemble, found generically, `oodbench.models.layers`), ``stem`` (the input of the first
stage: a ResNet's relu(bn1(conv1(x)))) or module names. The fit reads the per-sample
channel means once per (model, split) from the layer cache; scoring with ``noise > 0``
runs the model (one backward and one perturbed forward pass per layer).

OpenOOD's ``mds_ensemble_postprocessor.py`` (the ``openood`` profile sets both): its default
config reads only its feature list's first entry, the stem's output (``feature_type_list:
[mean]``, ``alpha_list: [1]``): ``layers: stem``; it divides the signed gradient by 0.5 for
every channel whatever the normalisation (a step of 2 * noise * std_c in pixels):
``input_std: [0.5, 0.5, 0.5]``. Not reproduced: a PCA/LDA reduction (OpenOOD's
``reduce_dim_list`` default is ``none``) and the logistic regression on OOD validation data
that chooses alpha when none is given (its default config gives alpha).

Measured on ../shared's CIFAR-10 ResNet-56 (layers layer1..layer3, noise 0, fit on 300 ID
validation JPEGs): OpenOOD's own code with the same three layers gives the same scores to
6e-7 (relative). With the defaults, 500 images per split: near-OOD (TIN) AUROC 81.16, MNIST 100.0.
"""

from __future__ import annotations

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.models.layers import LayerStatistic, forward_statistics, statistic
from oodbench.postprocessors.base import Either, ListOf, Number, OneOf, Outputs, Text
from oodbench.postprocessors.distance import class_means, mahalanobis, precision
from oodbench.postprocessors.gradient import InputGradientPostprocessor
from oodbench.postprocessors.odin import INPUT_STD, table_step
from oodbench.registry import register_postprocessor


@register_postprocessor("mds_ensemble", "mdsens")
class MDSEnsemble(InputGradientPostprocessor):
    family = "feature"
    needs_fit = True
    needs_layers = True
    fit_params = ("feature", "layers")
    defaults = {"noise": 0.0014, "feature": "mean", "layers": "stages", "alpha": None, "input_std": None}
    ranges = {"noise": Number(ge=0), "feature": OneOf("mean", "mean_var"),
              "layers": Either(OneOf("stages", "stem"), ListOf(Text())), "alpha": Either(OneOf(None), ListOf(Number())),
              "input_std": INPUT_STD}

    def layer_statistics(self) -> tuple[LayerStatistic, ...]:
        layers = self.params["layers"]
        return (LayerStatistic(self.params["feature"], layers if isinstance(layers, str) else tuple(layers)),)

    def fit(self, train: Outputs, val: Outputs) -> None:
        self.means, self.precisions = [], []
        for z in statistic(train, self.layer_statistics()[0], self.name):
            classes, means = class_means(z, train.labels)
            index = torch.searchsorted(classes, train.labels)
            self.means.append(means)
            self.precisions.append(precision(z, lambda rows, means=means: means[index[rows]]))

    def weights(self) -> torch.Tensor:
        alpha = self.params["alpha"]
        if alpha is None:
            return torch.ones(len(self.means), dtype=torch.float64)
        if len(alpha) != len(self.means):
            raise OodbenchError(f"mds_ensemble: alpha has {len(alpha)} weights for {len(self.means)} layers")
        return torch.tensor(alpha, dtype=torch.float64)

    def layer_scores(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """N x K of M_l(x, c) = -1/2 (z - mu_c)' P (z - mu_c), differentiable in z."""
        means, prec = self.means[layer].to(z.device), self.precisions[layer].to(z.device)
        return -0.5 * mahalanobis(z, means, prec)

    def score(self, outputs: Outputs) -> torch.Tensor:
        """Without noise, from the cached statistics; with noise, running the model batch by batch."""
        if float(self.params["noise"]) != 0:
            return super().score(outputs)
        layers = statistic(outputs, self.layer_statistics()[0], self.name)
        return sum(a * self.layer_scores(z, l).max(dim=1).values
                   for l, (a, z) in enumerate(zip(self.weights(), layers))).float()

    def score_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        stat = self.layer_statistics()[0]
        noise = table_step(float(self.params["noise"]), self.params["input_std"], model, x)
        alpha = self.weights().to(x.device)
        with torch.enable_grad():
            x0 = x.detach().requires_grad_(True)
            _, (layers,) = forward_statistics(model, x0, [stat])
            steps = []
            for l, z in enumerate(layers):
                closest = self.layer_scores(z, l).max(dim=1).values
                (grad,) = torch.autograd.grad(-closest.sum(), x0, retain_graph=l < len(layers) - 1)
                steps.append(torch.where(grad >= 0, 1.0, -1.0))
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for l, step in enumerate(steps):
                _, (perturbed,) = forward_statistics(model, x - noise * step, [stat])
                total += alpha[l] * self.layer_scores(perturbed[l], l).max(dim=1).values
        return total.float()
