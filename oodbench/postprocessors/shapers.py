"""The shaping rules of the ``<shaper>+<scorer>`` composites (`oodbench.postprocessors.compose`):
each rewrites the penultimate features z (or the classifier weights W) with state fitted on
the fit split. Their formulas and sources are in compose's notes; ReAct, ASH, SCALE and DICE
reuse `oodbench.postprocessors.shaping`, OptFS `oodbench.postprocessors.optfs`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.postprocessors import optfs
from oodbench.postprocessors.base import Number, Outputs
from oodbench.postprocessors.shaping import PRUNING_PERCENTILE, ash, kept_count, percentile, scale
from oodbench.postprocessors.streaming import column_mean


class Shaper:
    """A rule reshaping z or W; `fit` returns its state (a dict), the others read it.
    ``searched_as``: the registered method whose search lists the shaper's parameters take."""

    name: ClassVar[str] = ""
    searched_as: ClassVar[str] = ""
    needs_weights: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"percentile": 90}
    ranges: ClassVar[dict[str, Any]] = {"percentile": PRUNING_PERCENTILE}

    def fit(self, train: Outputs, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    def features(self, z: torch.Tensor, state: dict[str, Any], params: dict[str, Any]) -> torch.Tensor:
        return z

    def weight(self, weight: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return weight


class ReActShaper(Shaper):
    searched_as = "react"
    ranges = {"percentile": Number(ge=0, le=100)}

    def fit(self, train, params):
        return {"threshold": percentile(train.features, params["percentile"])}

    def features(self, z, state, params):
        return z.clamp(max=state["threshold"])


class ASHShaper(Shaper):
    searched_as = "ash"

    def __init__(self, variant: str):
        self.variant = variant

    def features(self, z, state, params):
        return ash(z, kept_count(z.shape[1], params["percentile"], f"ash_{self.variant}"), self.variant)


class ScaleShaper(Shaper):
    searched_as = "scale"
    defaults = {"percentile": 85}

    def features(self, z, state, params):
        return scale(z, kept_count(z.shape[1], params["percentile"], "scale"))


class DICEShaper(Shaper):
    searched_as = "dice"

    def fit(self, train, params):
        weight = train.fc[0].double()
        contribution = weight * column_mean(train.features)  # float64, a block of rows at a time
        return {"mask": contribution > percentile(contribution, params["percentile"])}

    def weight(self, weight, state):
        return weight * state["mask"].to(weight.dtype)


class BATSShaper(Shaper):
    """BATS (Zhu et al., "Boosting Out-of-distribution Detection with Typical Features",
    NeurIPS 2022; reference code github.com/alibaba/easyrobust, examples/ood_detection/BATS):
    z' = max(min(z, beta + lam gamma), beta - lam gamma) per unit, with gamma and beta the
    weight and bias of the model's last BatchNorm layer over D channels (the feature's
    typical set). The reference clamps the pooled penultimate features of its CIFAR
    ResNet-18 with the last BatchNorm's (beta, gamma) (its cifar_features_mean/std.pt), lam =
    3.25; its ViT uses lam = 1.05. A model with no BatchNorm of D channels cannot use it."""

    searched_as = "bats"
    needs_weights = True
    defaults = {"lam": 3.25}
    ranges = {"lam": Number(gt=0)}

    def fit(self, train, params):
        width = train.features.shape[1]
        net = getattr(train.model, "net", train.model)
        norms = [m for m in (net.modules() if net is not None else ()) if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.affine and m.num_features == width]
        if not norms:
            raise OodbenchError(f"bats needs the model's last BatchNorm over the {width} penultimate channels; "
                                + ("the outputs carry no model" if net is None else "this model has none"))
        gamma, beta = norms[-1].weight.detach().double().cpu(), norms[-1].bias.detach().double().cpu()
        return {"low": beta - params["lam"] * gamma, "high": beta + params["lam"] * gamma}

    def features(self, z, state, params):
        low, high = (state[k].to(device=z.device, dtype=z.dtype) for k in ("low", "high"))
        return torch.maximum(torch.minimum(z, high), low)  # the reference's order


class OptFSShaper(Shaper):
    """OptFS's piecewise-constant shaping fitted on the fit split (`oodbench.postprocessors.optfs`)."""

    searched_as = "optfs"
    defaults: ClassVar[dict[str, Any]] = {}
    ranges: ClassVar[dict[str, Any]] = {}

    def fit(self, train, params):
        return optfs.fit_shaping(train.features, train.logits.argmax(dim=1), train.fc[0])

    def features(self, z, state, params):
        return optfs.shaped(z, state)


SHAPERS: dict[str, Shaper] = {"react": ReActShaper(), "ash_b": ASHShaper("b"), "ash_p": ASHShaper("p"),
                              "ash_s": ASHShaper("s"), "scale": ScaleShaper(), "dice": DICEShaper(),
                              "bats": BATSShaper(),
                              "optfs": OptFSShaper()}
for _name, _shaper in SHAPERS.items():
    _shaper.name = _name
