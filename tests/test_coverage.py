"""NAC-UE on the penultimate layer against its definition written again here in NumPy: the
neuron states sigmoid(alpha z (W'(p - u))) with the gradient taken by autograd of the
uniform cross-entropy, the reference's threshold grid, counts on a class-balanced subset
chosen as the reference's TrainSubset, the coverage min(t / O, 1) and a sample's mean
coverage; batched == one-shot; an odd M is refused."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from oodbench.postprocessors import coverage
from oodbench.postprocessors.base import InvalidHyperparameter, Outputs
from oodbench.registry import POSTPROCESSORS

N_TRAIN, N_TEST, DIM, CLASSES = 300, 50, 12, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    w, b = (torch.tensor(a, dtype=torch.float32) for a in (rng.normal(size=(CLASSES, DIM)), rng.normal(size=CLASSES)))
    labels = torch.from_numpy(rng.integers(0, CLASSES, N_TRAIN))
    train = torch.tensor(rng.gamma(1.5, 1.0, size=(N_TRAIN, DIM)), dtype=torch.float32)
    test = torch.tensor(np.r_[rng.gamma(1.5, 1.0, size=(N_TEST // 2, DIM)), rng.gamma(4, 2, size=(N_TEST // 2, DIM))],
                        dtype=torch.float32)
    return (Outputs(logits=train @ w.T + b, features=train, labels=labels, fc=(w, b)),
            Outputs(logits=test @ w.T + b, features=test, fc=(w, b)))


def reference_subset(labels, count, seed=1):
    by_class = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    per_class = min(int(count / len(by_class)), min(map(len, by_class.values())))
    chosen = []
    for members in by_class.values():
        np.random.RandomState(seed).shuffle(members)
        chosen += members[:per_class]
    return chosen


def reference_grid(m):
    half = int(m / 2)
    x = np.linspace(1, np.sqrt(1000), num=half)
    low = np.log(x) / np.log(1000)
    grid = np.concatenate([low[:-1], (1 - low)[::-1]])
    grid[-1] += 0.01
    return np.append(grid, 1.2)


def reference_states(outputs, alpha):
    z = outputs.features.clone().requires_grad_(True)
    logits = z @ outputs.fc[0].T + outputs.fc[1]
    loss = -(torch.log_softmax(logits, dim=1) / logits.shape[1]).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return torch.sigmoid(alpha * z.detach() * grad).double().numpy()


def reference_scores(train, test, o=50, m=50, alpha=100.0, valid_num=1000):
    grid = reference_grid(m)
    keep = reference_subset(train.labels.tolist(), valid_num)
    states = reference_states(Outputs(logits=train.logits[keep], features=train.features[keep], fc=train.fc), alpha)
    counts = np.zeros((m - 1, DIM))
    for row in states:
        for n, s in enumerate(row):
            k = np.searchsorted(grid, s, side="right") - 1
            if 0 <= k < m - 1:
                counts[k, n] += 1
    cover = np.minimum(counts / o, 1)
    scores = []
    for row in reference_states(test, alpha):
        ks = [np.searchsorted(grid, s, side="right") - 1 for s in row]
        scores.append(np.mean([cover[k, n] if 0 <= k < m - 1 else 0.0 for n, k in enumerate(ks)]))
    return np.array(scores)


@pytest.mark.parametrize("params", [{}, {"O": 5, "M": 20, "sig_alpha": 1.0, "valid_num": 100},
                                    {"O": 10, "M": 500, "sig_alpha": 5.0}])
def test_nac_ue_is_its_definition(data, params):
    train, test = data
    method = POSTPROCESSORS.get("nac_ue")(**params)
    method.fit(train, train)
    p = method.params
    expected = reference_scores(train, test, p["O"], p["M"], p["sig_alpha"], p["valid_num"])
    np.testing.assert_allclose(method.score(test).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert np.std(expected) > 0
    halves = [Outputs(logits=test.logits[rows], features=test.features[rows], fc=test.fc)
              for rows in (slice(0, 7), slice(7, None))]
    np.testing.assert_array_equal(torch.cat([method.score(h) for h in halves]).numpy(), method.score(test).numpy())


def test_subset_and_grid_are_the_references():
    labels = np.random.default_rng(0).integers(0, 7, 500)
    assert coverage.balanced_subset(labels, 100).tolist() == reference_subset(labels.tolist(), 100)
    np.testing.assert_allclose(coverage.threshold_grid(50).numpy(), reference_grid(50))


def test_odd_m_is_refused(data):
    with pytest.raises(InvalidHyperparameter, match="M=51 must be even"):
        POSTPROCESSORS.get("nac_ue")(M=51).fit(data[0], data[0])
