"""Scores from a latent Gaussian that the model predicts for each image (its ``extras``).

KL to the standard normal. A model whose head predicts a diagonal Gaussian
q(u | x) = N(mu(x), diag(sigma(x)^2)), trained with a KL(q || N(0, I)) regulariser as in a
VAE's encoder, keeps in-distribution images close to the prior; an OOD image lands
further away. The KL divergence has the closed form (Kingma & Welling, "Auto-Encoding
Variational Bayes", ICLR 2014, Appendix B), with logvar = log sigma^2:

    KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)

and the score is its negative (higher = more in-distribution), summed over every
non-batch dimension of ``mu`` and ``logvar`` and computed in float64.

The model must provide the extras ``mu`` and ``logvar`` (``needs_extras``), e.g.
``oodbench.evaluate(model, ..., extras={"mu": "mu", "logvar": "logvar"})`` for a model
that sets ``self.mu`` and ``self.logvar`` in forward; without them scoring fails with one
line naming them (`oodbench.errors.MissingExtras`), and a run marks the cell missing.
"""

from __future__ import annotations

import torch

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.registry import register_postprocessor


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, in float64: inputs N x ..., result N."""
    mu, logvar = mu.double().flatten(1), logvar.double().flatten(1)
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(dim=1)


@register_postprocessor("kl_gaussian")
class KLGaussian(Postprocessor):
    needs_extras = ("mu", "logvar")

    def score(self, outputs: Outputs) -> torch.Tensor:
        extras = self.required_extras(outputs)
        mu, logvar = extras["mu"], extras["logvar"]
        if mu.shape != logvar.shape:
            raise OodbenchError(f"kl_gaussian: mu has shape {list(mu.shape)} but logvar {list(logvar.shape)}")
        return -kl_to_standard_normal(mu, logvar)
