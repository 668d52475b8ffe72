"""ViM, Virtual-logit Matching (Wang et al., CVPR 2022).

The classifier's (W, b) give an origin u = -pinv(W) b (where all logits are zero). The
principal subspace is spanned by the D leading eigenvectors of the uncentred covariance
(1/N) sum_i (z_i - u)(z_i - u)' of the train features; the residual of a feature is its
part outside that subspace, r(z) = || P_perp (z - u) ||. With
alpha = mean_i max_c f_ic / mean_i r(z_i) over the train split,

    score = logsumexp(f) - alpha * r(z)        (higher = more ID).

D must stay below the feature dimension (otherwise the residual is identically zero);
a larger D is refused with an `InvalidHyperparameter`, which the search skips. The
default, ``dim: auto``, is the paper's D = 256 where the features have 512 dimensions
or more, and half the feature dimension below that (the built-in digits CNN: 64 of 128).
"""

from __future__ import annotations

import torch

from oodbench.postprocessors.base import (BLOCK_ROWS, Either, Integer, InvalidHyperparameter, OneOf, Outputs,
                                          Postprocessor, in_blocks)
from oodbench.registry import register_postprocessor

DEFAULT_DIM = 256


def subspace_dim(requested: int | str, feature_dim: int) -> int:
    """The principal-subspace dimension D: `requested`, or for "auto" min(256, feature_dim // 2)."""
    if requested == "auto":
        return min(DEFAULT_DIM, feature_dim // 2)
    if requested >= feature_dim:
        raise InvalidHyperparameter(f"vim: dim={requested} must be below the feature dimension {feature_dim} "
                                    f"(at most {feature_dim - 1})")
    return int(requested)


def classifier_origin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u = -pinv(W) b: the feature point whose logits are (least-squares) zero."""
    return -torch.linalg.pinv(weight.double()) @ bias.double()


def residual_basis(features: torch.Tensor, origin: torch.Tensor, dim: int) -> torch.Tensor:
    """D_feat x (D_feat - dim) orthonormal basis of the complement of the top-`dim` subspace."""
    covariance = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for start in range(0, len(features), BLOCK_ROWS):
        centred = features[start : start + BLOCK_ROWS].double() - origin
        covariance += centred.T @ centred
    _, vectors = torch.linalg.eigh(covariance / len(features))  # eigenvalues ascending
    return vectors[:, : features.shape[1] - dim]


@register_postprocessor("vim")
class ViM(Postprocessor):
    family = "feature"
    needs_features = True
    needs_fit = True
    defaults = {"dim": "auto"}
    ranges = {"dim": Either(OneOf("auto"), Integer(ge=1))}  # and below the feature dimension, checked on the data
    fit_params = ("dim",)

    def fit(self, train: Outputs, val: Outputs) -> None:
        dim = subspace_dim(self.params["dim"], train.features.shape[1])
        self.origin = classifier_origin(*train.fc)
        self.basis = residual_basis(train.features, self.origin, dim)
        train_residual = self.residual(train.features).mean()
        top = in_blocks(lambda logits: logits.double().max(dim=1).values, train.logits)  # N values, not N x C
        self.alpha = float(top.mean() / train_residual)

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        return in_blocks(lambda z: ((z.double() - self.origin) @ self.basis).norm(dim=1), features)

    def score(self, outputs: Outputs) -> torch.Tensor:
        energy = torch.logsumexp(outputs.logits.double(), dim=1)
        return (energy - self.alpha * self.residual(outputs.features)).float()
