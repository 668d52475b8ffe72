"""OptFS against its closed form written again here in NumPy, interval by interval as the
reference code loops (github.com/Qinyu-Allen-Zhao/OptFSOOD, detector/ours.py): quantile
bounds, ``numpy.arange`` intervals, I_k over the fit split's predicted-class contributions,
theta = 1000 I / ||I||, the vanilla score and the energy composite; batched == one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from oodbench.postprocessors import optfs
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    w, b = rng.normal(size=(5, 20)), rng.normal(size=5)
    train = rng.gamma(1.2, 1.0, size=(400, 20))
    test = np.r_[rng.gamma(1.2, 1.0, size=(30, 20)), rng.gamma(3.0, 1.5, size=(30, 20))]
    as_out = lambda z: Outputs(logits=torch.tensor(z @ w.T + b, dtype=torch.float32),  # noqa: E731
                               features=torch.tensor(z, dtype=torch.float32),
                               fc=(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
    return as_out(train), as_out(test)


def reference(train, test):
    z, w = train.features.double().numpy(), train.fc[0].double().numpy()
    pred = train.logits.numpy().argmax(axis=1)
    low, high = np.quantile(z, 1e-3), np.quantile(z, 1 - 1e-3)
    width = (high - low) / 100
    lefts = np.arange(low, high, width)
    importance = np.array([np.mean(np.sum(((z >= x) & (z < x + width)) * w[pred] * z, axis=1)) for x in lefts])
    theta = importance / np.linalg.norm(importance) * 1000
    zt = test.features.double().numpy()
    shaped = sum(((zt >= x) & (zt < x + width)) * zt * t for x, t in zip(lefts, theta))
    vanilla = np.sum(w[test.logits.numpy().argmax(axis=1)] * shaped, axis=1)
    return vanilla, logsumexp(shaped @ w.T + test.fc[1].double().numpy(), axis=1), len(lefts)


def test_optfs_is_its_closed_form(data):
    train, test = data
    vanilla, energy, intervals = reference(train, test)
    method = POSTPROCESSORS.get("optfs")()
    method.fit(train, train)
    assert len(method.shaping["theta"]) == intervals
    np.testing.assert_allclose(method.score(test).numpy(), vanilla, rtol=1e-10)
    composite = POSTPROCESSORS.get("optfs+ebo")()
    composite.fit(train, train)
    np.testing.assert_allclose(composite.score(test).numpy(), energy, rtol=1e-10)
    assert vanilla[30:].mean() < vanilla[:30].mean()  # the shifted half scores lower
    halves = [Outputs(logits=test.logits[s], features=test.features[s], fc=test.fc) for s in (slice(0, 13),
                                                                                          slice(13, None))]
    np.testing.assert_array_equal(torch.cat([method.score(h) for h in halves]).numpy(), method.score(test).numpy())


def test_values_outside_the_intervals_are_zeroed():
    state = {"lefts": torch.tensor([0.0, 1.0]), "width": torch.tensor(1.0), "theta": torch.tensor([2.0, 3.0])}
    z = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 1.99, 2.0, 5.0]], dtype=torch.float64)
    assert optfs.shaped(z, state).tolist() == [[0.0, 0.0, 1.0, 3.0, 5.97, 0.0, 0.0]]
