"""LINe against the reference's RouteLUNCH written again here in NumPy, sample by sample: the
per-label mean Taylor contributions z * W_y, the class-wise unit masks (p_a-th percentile)
and weight masks (p_w-th percentile of |A_c| W), the clip, and the energy of the masked
classifier of the predicted class; batched == one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

CLASSES, DIM = 6, 18


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(CLASSES, DIM)), rng.normal(size=CLASSES)
    train, test = rng.gamma(1.0, 0.6, size=(240, DIM)), rng.gamma(1.0, 0.8, size=(40, DIM))
    labels = rng.integers(0, CLASSES, 240)
    as_out = lambda z, y=None: Outputs(  # noqa: E731
        logits=torch.tensor(z @ w.T + b, dtype=torch.float32), features=torch.tensor(z, dtype=torch.float32),
        labels=None if y is None else torch.from_numpy(y),
        fc=(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
    return as_out(train, labels), as_out(test)


def reference(train, test, p_w, p_a, clip):
    z, y = train.features.double().numpy(), train.labels.numpy()
    w, b = (t.double().numpy() for t in train.fc)
    contrib = np.stack([(z[y == c] * w[c]).mean(axis=0) for c in range(CLASSES)])
    masked_w, keep = [], []
    for c in range(CLASSES):
        matrix = np.abs(contrib[c]) * w
        masked_w.append(w * (matrix > np.percentile(matrix, p_w)))
        keep.append(contrib[c] > np.percentile(contrib[c], p_a))
    scores = []
    for row in np.minimum(test.features.double().numpy(), clip):
        c = np.argmax(w @ row + b)
        scores.append(logsumexp(masked_w[c] @ (row * keep[c]) + b))
    return np.array(scores)


@pytest.mark.parametrize("p_w,p_a,clip", [(90, 90, 1.0), (10, 10, 0.8), (50, 30, 5.0)])
def test_line_is_the_reference_routing(data, p_w, p_a, clip):
    train, test = data
    method = POSTPROCESSORS.get("line")(p_w=p_w, p_a=p_a, clip_threshold=clip)
    method.fit(train, train)
    expected = reference(train, test, p_w, p_a, clip)
    got = method.score(test).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.std(expected) > 0
    halves = [Outputs(logits=test.logits[s], features=test.features[s], fc=test.fc) for s in (slice(0, 11),
                                                                                          slice(11, None))]
    np.testing.assert_array_equal(torch.cat([method.score(h) for h in halves]).numpy(), got)
