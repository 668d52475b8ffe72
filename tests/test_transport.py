"""OTOD against its reference's computation with scipy's Wasserstein distance (the reference
calls ``scipy.stats.wasserstein_distance`` per sample against constant vectors); batched ==
one-shot."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax
from scipy.stats import wasserstein_distance

from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS


def test_otod_is_the_reference_computation():
    rng = np.random.default_rng(8)
    z = torch.tensor(rng.gamma(1.5, 1.0, size=(25, 12)), dtype=torch.float32)
    f = torch.tensor(rng.normal(0, 3, size=(25, 7)), dtype=torch.float32)
    outputs = Outputs(logits=f, features=z)
    normal = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731

    def d(v):
        return min(wasserstein_distance(v, np.full_like(v, 1 / len(v))), wasserstein_distance(v, np.zeros_like(v)))

    feats, logits = normal(z.double().numpy()), normal(f.double().numpy())
    probs = normal(softmax(f.double().numpy() / 3.0, axis=1))
    expected = np.array([-(d(feats[i]) + d(logits[i]) + d(probs[i])) / 3 for i in range(25)])
    got = POSTPROCESSORS.get("otod")().score(outputs).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.std(expected) > 0
    halves = [Outputs(logits=f[s], features=z[s]) for s in (slice(0, 9), slice(9, None))]
    np.testing.assert_array_equal(torch.cat([POSTPROCESSORS.get("otod")().score(h) for h in halves]).numpy(), got)
