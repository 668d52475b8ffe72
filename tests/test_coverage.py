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
    keep = reference_subset(train.labels.tolist(), valid_num)
    fit_states = reference_states(Outputs(logits=train.logits[keep], features=train.features[keep], fc=train.fc), alpha)
    return reference_coverage_scores(fit_states, reference_states(test, alpha), o, m)


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


# ----------------------------------------------------------------- nac: several layers, the model run again


def reference_layer_states(adapter, x, alphas):
    """States of conv1, conv2 and the penultimate features, by a forward pass written out with
    the tensors kept and one autograd.grad of the uniform cross-entropy."""
    net = adapter.net
    with torch.enable_grad():
        xn = adapter.normalize(x.clone().requires_grad_(True))
        c1 = net.conv1(xn)
        h = torch.relu(net.bn1(c1))
        c2 = net.conv2(h)
        z = torch.relu(net.bn2(c2) + h).mean(dim=(2, 3))
        logits = net.fc(z)
        loss = -(torch.log_softmax(logits, dim=1) / logits.shape[1]).sum()
        grads = torch.autograd.grad(loss, [c1, c2, z])
    pool = lambda t: t.sum(dim=(2, 3)) if t.ndim > 2 else t  # noqa: E731  (the reference's avg_pooling sums)
    return [torch.sigmoid(a * pool(o.detach()) * pool(g)).double().numpy()
            for o, g, a in zip((c1, c2, z), grads, alphas)]


def reference_coverage_scores(fit_states, test_states, o, m):
    grid = reference_grid(m)
    counts = np.zeros((m - 1, fit_states.shape[1]))
    for row in fit_states:
        for n, s in enumerate(row):
            k = np.searchsorted(grid, s, side="right") - 1
            if 0 <= k < m - 1:
                counts[k, n] += 1
    cover = np.minimum(counts / o, 1)
    out = []
    for row in test_states:
        ks = [np.searchsorted(grid, s, side="right") - 1 for s in row]
        out.append(np.mean([cover[k, n] if 0 <= k < m - 1 else 0.0 for n, k in enumerate(ks)]))
    return np.array(out)


def test_nac_over_three_layers_is_its_definition():
    from tests.test_gradient_postprocessors import images, outputs_for, tiny_adapter

    adapter = tiny_adapter()
    train_x, test_x = images(count=40, seed=5), images(count=12, seed=6)
    labels = torch.arange(40) % 5
    fit = outputs_for(adapter, train_x, batch_size=16)
    fit.labels = labels
    params = {"layers": ["conv1", "conv2", "penultimate"], "O": [2, 3, 2], "M": [20, 50, 20],
              "sig_alpha": [5.0, 50.0, 10.0], "valid_num": 30}
    method = POSTPROCESSORS.get("nac")(**params)
    method.fit(fit, fit)
    got = method.score(outputs_for(adapter, test_x, batch_size=5)).numpy()
    keep = reference_subset(labels.tolist(), 30)
    fit_states = reference_layer_states(adapter, train_x[keep], params["sig_alpha"])
    test_states = reference_layer_states(adapter, test_x, params["sig_alpha"])
    expected = np.mean([reference_coverage_scores(f, t, o, m) for f, t, o, m
                        in zip(fit_states, test_states, params["O"], params["M"])], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert np.std(expected) > 0


def test_nac_on_the_penultimate_layer_is_nac_ue():
    from tests.test_gradient_postprocessors import images, outputs_for, tiny_adapter

    adapter = tiny_adapter()
    train_x, test_x = images(count=40, seed=5), images(count=12, seed=6)
    with torch.no_grad():
        z_train, f_train = adapter.features(train_x)
        z_test, f_test = adapter.features(test_x)
    labels = torch.arange(40) % 5
    fit = outputs_for(adapter, train_x)
    fit.labels = labels
    deep = POSTPROCESSORS.get("nac")(layers=["penultimate"], O=[3], M=[20], sig_alpha=[10.0], valid_num=30)
    deep.fit(fit, fit)
    flat = POSTPROCESSORS.get("nac_ue")(O=3, M=20, sig_alpha=10.0, valid_num=30)
    flat.fit(Outputs(logits=f_train, features=z_train, labels=labels, fc=adapter.fc), None)
    np.testing.assert_allclose(deep.score(outputs_for(adapter, test_x)).numpy(),
                               flat.score(Outputs(logits=f_test, features=z_test, fc=adapter.fc)).numpy(), atol=1e-12)


def test_nac_per_layer_lists_must_match_the_layers(data):
    from tests.test_gradient_postprocessors import images, outputs_for, tiny_adapter

    adapter = tiny_adapter()
    fit = outputs_for(adapter, images(count=10, seed=5))
    fit.labels = torch.arange(10) % 5
    with pytest.raises(InvalidHyperparameter, match="O has 2 values for 3 layers"):
        POSTPROCESSORS.get("nac")(layers=["conv1", "conv2", "penultimate"], O=[1, 2], M=[20], sig_alpha=[1.0]).fit(
            fit, fit)
