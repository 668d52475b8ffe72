"""OTOD: an optimal-transport score (Gao, He & Pu, "Detecting OOD Samples via Optimal Transport
Scoring Function", arXiv:2502.16115, 2025; reference code github.com/HengGao12/OTOD, its
``otdp`` postprocessor, which its CIFAR and ImageNet OTOD scripts run).

For each sample, three vectors are L2-normalised (the reference adds 1e-10 after the
division): the penultimate features z, the logits f and softmax(f / T) (T = 3). For a vector
v of n entries, d(v) is the smaller 1-D Wasserstein-1 distance between the distribution of
its entries and a point mass, at 1/n or at 0 (``scipy.stats.wasserstein_distance`` against
a constant vector, which equals mean_i |v_i - c|):

    d(v) = min(mean |v_i - 1/n|, mean |v_i|),    score = -(d(z) + d(f) + d(p)) / 3.

No fit, no hyperparameters but T (the reference's 3, not searched). Computed in float64 from
the float32 outputs.
"""

from __future__ import annotations

import torch

from oodbench.postprocessors.base import Number, Outputs, Postprocessor, in_blocks
from oodbench.registry import register_postprocessor


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| + 1e-10, per row, as the reference normalises."""
    return v / v.norm(dim=1, keepdim=True) + 1e-10


def point_mass_distance(v: torch.Tensor) -> torch.Tensor:
    """min over c in {1/n, 0} of the W1 distance between the row's entries and a point mass at c."""
    return torch.minimum((v - 1.0 / v.shape[1]).abs().mean(dim=1), v.abs().mean(dim=1))


@register_postprocessor("otod")
class OTOD(Postprocessor):
    family = "feature"
    needs_features = True
    defaults = {"temperature": 3.0}
    ranges = {"temperature": Number(gt=0)}

    def score(self, outputs: Outputs) -> torch.Tensor:
        temperature = float(self.params["temperature"])

        def block(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            z, logits = z.double(), logits.double()
            probs = torch.softmax(logits / temperature, dim=1)
            return -sum(point_mass_distance(unit(v)) for v in (z, logits, probs)) / 3

        return in_blocks(block, outputs.features, outputs.logits)
