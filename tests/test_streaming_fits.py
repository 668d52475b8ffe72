"""Fits that stream over the fit split give today's numbers.

- `streaming.percentile` equals ``np.percentile`` (its linear interpolation) bit for bit on
  ties, zeros, huge values, NaN, 0 and 100, over one block and many;
- `column_mean` equals ``.double().mean(dim=0)`` to float64 rounding; `class_means` with a
  row mask equals it on the masked copy, bit for bit;
- every method whose fit now streams, fitted on outputs memory-mapped from a real output
  cache entry with tiny blocks, scores as it did fitted on in-memory copies with today's
  statistics (percentiles through NumPy on a copy, means of a float64 copy, KNN and
  Relation against one bank block); OpenMax, GrOOD and CFOOD now gather only the rows they
  use (their formulas: test_openood_methods).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodbench.storage.caches import OutputCache
from oodbench.postprocessors import distance, neighbours, prototypes, shapers, shaping, streaming
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS


def test_percentile_is_numpys_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(streaming, "BLOCK_VALUES", 64)  # many blocks, rows split across them
    for trial in range(80):
        x = rng.standard_normal((int(rng.integers(1, 400)), int(rng.integers(1, 6)))).astype(np.float32)
        x = [x, np.maximum(x, 0), np.round(x * 2) / 2, x * np.float32(1e30)][trial % 4]  # ReLU zeros, ties, huge
        for p in (0, 100, 50, 90, 99.9, 0.1, 1e-9, 100 - 1e-9, float(rng.uniform(0, 100))):
            expected = float(np.percentile(x.ravel(), p))
            assert streaming.percentile(torch.from_numpy(x), p) == expected, (x.shape, p)
    x = torch.from_numpy(rng.standard_normal((300, 7)).astype(np.float32))
    ps = [0, 12.5, 50, 97.3, 100]
    assert streaming.percentiles(x, ps) == [float(np.percentile(x.numpy().ravel(), p)) for p in ps]
    with_nan = torch.ones(50, 3)
    with_nan[7, 1] = float("nan")
    assert np.isnan(streaming.percentile(with_nan, 30)) and np.isnan(np.percentile(with_nan.numpy(), 30))


def test_column_mean_and_masked_class_means_match_the_in_memory_forms(monkeypatch):
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.gamma(2.0, 1.0, (1000, 9)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, 1000))
    monkeypatch.setattr(streaming, "BLOCK_VALUES", 90)
    # blocks add their float64 sums in another order than one reduction: equal to rounding
    torch.testing.assert_close(streaming.column_mean(features), features.double().mean(dim=0), rtol=1e-13, atol=0)
    keep = torch.from_numpy(rng.random(1000) < 0.6)
    monkeypatch.setattr(distance, "BLOCK_ROWS", 37)
    classes, means = distance.class_means(features, labels, keep=keep)
    monkeypatch.setattr(distance, "BLOCK_ROWS", 4096)
    copy_classes, copy_means = distance.class_means(features[keep], labels[keep])
    assert torch.equal(classes, copy_classes) and torch.equal(means, copy_means)


def outputs_of(rng, n: int, dim: int, classes: int, shift: float, weight, bias) -> Outputs:
    features = torch.from_numpy(np.maximum(rng.normal(shift, 1.0, (n, dim)), 0).astype(np.float32))
    logits = features @ weight.T + bias
    labels = torch.from_numpy(rng.integers(0, classes, n))
    labels[: n // 2] = logits[: n // 2].argmax(dim=1)  # half correctly classified (SHE's patterns)
    return Outputs(logits=logits, features=features, labels=labels, fc=(weight, bias))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A fit split stored in and read back from a real output cache entry (memory-mapped)."""
    rng = np.random.default_rng(2)
    weight, bias = torch.from_numpy(rng.normal(0, 0.3, (6, 32)).astype(np.float32)), torch.zeros(6)
    train = outputs_of(rng, 3000, 32, 6, 0.5, weight, bias)
    cache = OutputCache(tmp_path_factory.mktemp("cache"))
    cache.save("fit", train)
    return cache.load("fit"), outputs_of(rng, 200, 32, 6, 0.5, weight, bias), outputs_of(rng, 150, 32, 6, 0.0,
                                                                                        weight, bias)


STREAMED = {"react": {}, "vra": {}, "gen_react": {}, "mds": {}, "she": {}, "vim": {"dim": 8}, "knn": {"k": 5},
            "dice": {}, "rmds": {}, "fdbd": {}, "nci": {}, "openmax": {}, "grood": {}, "cfood": {}, "relation": {}}
# float64 sums taken block by block instead of in one reduction (column_mean's means, Relation's
# edges over bank blocks): the same terms added in another order, so scores to 1e-6
ROUNDED = {"dice", "rmds", "fdbd", "nci", "relation"}


def scores(name: str, params: dict, data) -> list[torch.Tensor]:
    train, test, ood = data
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(train, test)
    return [method.score(test), method.score(ood)]


@pytest.mark.parametrize("name", sorted(STREAMED))
def test_streaming_fits_score_as_the_in_memory_fits(name, data, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_VALUES", 1000)
    monkeypatch.setattr(distance, "BANK_ROWS", 256)  # KNN: the 3000-row bank in 12 blocks
    monkeypatch.setattr(distance, "BLOCK_ROWS", 300)
    monkeypatch.setattr(neighbours, "RELATION_BANK_ROWS", 700)
    streamed = scores(name, STREAMED[name], data)
    monkeypatch.undo()
    in_memory = lambda values, p: float(np.percentile(values.detach().cpu().numpy().ravel(), p))  # noqa: E731
    whole = lambda tensor: tensor.double().mean(dim=0)  # noqa: E731
    for module in (shaping, shapers, distance, prototypes):
        monkeypatch.setattr(module, "column_mean", whole, raising=False)
    for module in (shaping, shapers):  # gen_react is a composite of shapers' ReAct
        monkeypatch.setattr(module, "percentile", in_memory)
    monkeypatch.setattr(shaping, "percentiles", lambda values, ps: [in_memory(values, p) for p in ps])
    monkeypatch.setattr(distance, "BANK_ROWS", 1 << 30)
    monkeypatch.setattr(neighbours, "RELATION_BANK_ROWS", 1 << 30)
    train, test, ood = data
    in_memory_train = Outputs(logits=train.logits.clone(), features=train.features.clone(), labels=train.labels.clone(),
                              fc=train.fc)
    today = scores(name, STREAMED[name], (in_memory_train, test, ood))
    for got, expected in zip(streamed, today):
        if name in ROUNDED:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        elif name == "knn":  # the same similarities, merged over bank blocks: a matrix product's
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # last bits follow its shape
        else:
            assert torch.equal(got, expected)
