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
from oodbench.postprocessors import distance, neighbours, optfs, prototypes, shapers, shaping, streaming
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
    qs = [0, 1e-3, 0.3, 1 - 1e-3, 1]  # OptFS's fractions
    assert streaming.quantiles(x, qs) == [float(np.quantile(x.numpy().ravel(), q)) for q in qs]
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


STREAMED = {"react": {}, "vra": {}, "gen_react": {}, "mds": {}, "she": {}, "vim": {"dim": 8}, "knn": {"k": 5}, "optfs": {},
            "mds_pp": {}, "rmds_pp": {},
            "dice": {}, "rmds": {}, "fdbd": {}, "nci": {}, "openmax": {}, "grood": {}, "cfood": {}, "relation": {}}
# float64 sums taken block by block instead of in one reduction (column_mean's means, Relation's
# edges over bank blocks): the same terms added in another order, so scores to 1e-6
ROUNDED = {"dice", "rmds", "rmds_pp", "fdbd", "nci", "relation"}


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
    monkeypatch.setattr(distance, "UnitRows", distance.l2_normalise)  # Mahalanobis++: one normalised copy
    monkeypatch.setattr(optfs, "quantiles", lambda values, qs: [np.quantile(values.numpy().ravel(), q) for q in qs])
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


def grood_in_memory(train: Outputs, tests: list[Outputs]) -> list[torch.Tensor]:
    """GrOOD before its bank was rebuilt block by block: the whole float64 gradient bank of the
    correctly classified fit rows in memory, every test row against all of it in one product."""
    method = POSTPROCESSORS.get("grood")()
    method.fit(train, train)
    kept = train.features[train.labels == train.predictions]
    bank = method.noise_gradients(kept, method.noise_weights(kept))
    scores = []
    for test in tests:
        g = method.noise_gradients(test.features, method.noise_weights(test.features))
        nearest = ((g * g).sum(1, keepdim=True) - 2 * g @ bank.T + (bank * bank).sum(1)).clamp_min(0).min(dim=1)
        scores.append(-nearest.values.float())
    return scores


def cfood_in_memory(train: Outputs, tests: list[Outputs], alpha: float, k: float) -> list[torch.Tensor]:
    """CFOOD before its references were read block by block: n float64 unit references (in
    randperm's order) and their sorted distances in memory, each test row against all of them."""
    total = len(train.features)
    n = int(alpha * total) if alpha < 1 else total
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(neighbours.CFOOD_SEED))[:n]
    references = neighbours.cfood_unit(train.features[chosen] if n < total else train.features)
    kappa, positions = neighbours.cfood_grid(n)
    known = neighbours.squared_distances(references, references).sort(dim=1).values[:, positions]
    scores = []
    for test in tests:
        distances = neighbours.squared_distances(neighbours.cfood_unit(test.features), references)
        known_np, distances_np = known.numpy(), distances.numpy()
        counts = np.stack([np.count_nonzero(known_np >= row[:, None], axis=0) for row in distances_np])
        reached = torch.from_numpy(counts >= k * n)
        scores.append(-torch.where(reached.any(dim=1), kappa[reached.int().argmax(dim=1)], 1.0).float())
    return scores


@pytest.mark.parametrize("name, params", [("grood", {}), ("cfood", {"alpha": 0.1}),
                                          ("cfood", {"alpha": 0.5, "k": 0.05})])
def test_bank_methods_rebuilt_from_the_mapped_fit_split_score_as_the_in_memory_bank(name, params, data, monkeypatch):
    """GrOOD and CFOOD keep no N x D float64 copy (their banks are rebuilt from the mapped fit
    features, a block at a time): bit for bit today's in-memory bank, over many blocks."""
    train, test, ood = data
    expected = (grood_in_memory(train, [test, ood]) if name == "grood" else
                cfood_in_memory(train, [test, ood], params["alpha"], params.get("k", 0.01)))
    monkeypatch.setattr(prototypes, "BLOCK_ROWS", 257)  # GrOOD's fit rows rebuilt at once
    monkeypatch.setattr(neighbours, "CFOOD_REFERENCE_ROWS", 97)
    monkeypatch.setattr(neighbours, "BANK_BLOCK_ELEMENTS", 1500 * 40)  # CFOOD: 40 references sorted at once
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(train, test)
    assert method.bank_features.data_ptr() == train.features.data_ptr()  # a view, not a copy
    state = {key: value for key, value in method.fit_state().items() if key not in method.fit_views}
    width, classes = train.features.shape[1], train.logits.shape[1]
    assert not [key for key, v in state.items()  # what is cached holds no feature row per fit sample
                if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width and len(v) > classes]
    for got, want in zip([method.score(test), method.score(ood)], expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["grood", "cfood"])
def test_a_cached_bank_state_views_the_fit_split_again(name, data, tmp_path, monkeypatch):
    """The fit-state cache stores GrOOD's and CFOOD's states without their bank features; loading
    one reads the (mapped) fit split again and points the bank at it: the same scores, no refit."""
    from oodbench.storage.caches import FitStateCache
    from oodbench.benchmark.fitting import fit_cached

    train, test, _ = data
    cache, keys = FitStateCache(tmp_path), ["fit-key", "val-key"]
    fitted = POSTPROCESSORS.get(name)()
    fit_cached(fitted, train, test, cache, keys)
    assert "bank_features" not in cache.load(FitStateCache.key(fitted, keys))
    reads = []
    loaded = POSTPROCESSORS.get(name)()
    monkeypatch.setattr(type(loaded), "fit", lambda *args: pytest.fail("refitted"))
    fit_cached(loaded, lambda: reads.append(1) or train, test, cache, keys)
    assert reads == [1] and loaded.bank_features.data_ptr() == train.features.data_ptr()
    assert torch.equal(loaded.score(test), fitted.score(test))
