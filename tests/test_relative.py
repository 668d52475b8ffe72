"""CARef and CADRef against their definitions written again here in NumPy, sample by sample:
means of the fit samples grouped by predicted class, the sign-split L1 errors relative to
||z||_1, each logit score and its fit-split mean; a class predicted by no fit sample takes
the mean of all fit features; batched == one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

CLASSES = 12


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(CLASSES, 16)), rng.normal(size=CLASSES)
    b[-1] = -50  # class 11: predicted by no fit sample
    train = rng.gamma(1.5, 1.0, size=(300, 16))
    test = rng.gamma(1.5, 1.0, size=(40, 16))
    test[0] = 0.01 + 100 * (w[-1] > 0)  # a test sample predicted as class 11
    as_out = lambda z: Outputs(logits=torch.tensor(z @ w.T + b, dtype=torch.float32),  # noqa: E731
                               features=torch.tensor(z, dtype=torch.float32),
                               fc=(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
    return as_out(train), as_out(test)


def logit_score(f, name):
    if name == "ebo":
        return logsumexp(f)
    if name == "mls":
        return f.max()
    p = softmax(f)
    if name == "msp":
        return p.max()
    top = np.sort(p)[-10:]
    return 1 / np.sum(top**0.1 * (1 - top) ** 0.1)


def reference(train, test, name):
    z, f = train.features.double().numpy(), train.logits.double().numpy()
    pred = f.argmax(axis=1)
    assert CLASSES - 1 not in pred
    means = [z[pred == c].mean(axis=0) if (pred == c).any() else z.mean(axis=0) for c in range(CLASSES)]
    mean_score = np.mean([logit_score(row, name) for row in f])
    w = train.fc[0].double().numpy()
    caref, cadref = [], []
    for zi, fi in zip(test.features.double().numpy(), test.logits.double().numpy()):
        c = fi.argmax()
        d, norm = zi - means[c], np.abs(zi).sum()
        caref.append(-np.abs(d).sum() / norm)
        raising = np.maximum(d * np.sign(w[c]), 0).sum() / norm
        lowering = np.maximum(-d * np.sign(w[c]), 0).sum() / norm
        cadref.append(-(raising / logit_score(fi, name) + lowering / mean_score))
    return np.array(caref), np.array(cadref)


@pytest.mark.parametrize("name", ["ebo", "mls", "msp", "gen"])
def test_caref_and_cadref_are_their_definitions(data, name):
    train, test = data
    assert test.logits[0].argmax() == CLASSES - 1
    caref, cadref = reference(train, test, name)
    for method, expected in ((POSTPROCESSORS.get("caref")(), caref),
                             (POSTPROCESSORS.get("cadref")(logit_score=name), cadref)):
        method.fit(train, train)
        got = method.score(test).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-9)
        halves = [Outputs(logits=test.logits[s], features=test.features[s], fc=test.fc)
                  for s in (slice(0, 9), slice(9, None))]
        np.testing.assert_array_equal(torch.cat([method.score(h) for h in halves]).numpy(), got)
    assert np.std(caref) > 0 and np.std(cadref) > 0
