"""WeiPer and WeiPer+KLD against the algorithm of the authors' code (github.com/mgranz/weiper,
``weiper_kldiv/utils.py``), written again here sample by sample in NumPy: the perturbed
classifier from the reference's draws (``torch.manual_seed`` then one ``randn_like`` per
repeat), per-sample histograms, moving-average smoothing with replicate padding, the
symmetric KL and the mean perturbed MSP; the grid equals one-by-one scoring; batched ==
one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from oodbench.postprocessors import weiper
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

N_TRAIN, N_TEST, DIM, CLASSES = 200, 30, 16, 5


def as_outputs(z, w, b) -> Outputs:
    z, w, b = (torch.tensor(a, dtype=torch.float32) for a in (z, w, b))
    return Outputs(logits=z @ w.T + b, features=z, labels=torch.zeros(len(z), dtype=torch.long), fc=(w, b))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(CLASSES, DIM)), rng.normal(size=CLASSES)
    train = rng.gamma(1.5, 1.0, size=(N_TRAIN, DIM))
    test = np.r_[rng.gamma(1.5, 1.0, size=(N_TEST // 2, DIM)), rng.gamma(3.0, 1.5, size=(N_TEST - N_TEST // 2, DIM))]
    return as_outputs(train, w, b), as_outputs(test, w, b)


def reference_perturbed(fc, repeats, distance, seed):
    weight = fc[0].float()
    torch.manual_seed(seed)
    noise = [torch.nn.functional.normalize(torch.randn_like(weight), dim=1) for _ in range(repeats)]
    big = torch.cat([weight + distance * n * weight.norm(dim=1)[:, None] for n in noise]).double().numpy()
    return big, np.tile(fc[1].double().numpy(), repeats)


def reference_density(values, low, high, bins):
    edges = (torch.tensor(low, dtype=torch.float32) + torch.arange(bins + 1, dtype=torch.float32) / bins
             * (torch.tensor(high, dtype=torch.float32) + 1e-8 - torch.tensor(low, dtype=torch.float32))).numpy()
    out = np.zeros((len(values), bins))
    for i, row in enumerate(values.astype(np.float32)):
        for v in row:
            k = np.searchsorted(edges, v, side="right") - 1  # edges[k] <= v < edges[k+1]
            if 0 <= k < bins:
                out[i, k] += 1
    return out / values.shape[1]


def reference_smooth(row, window):
    left = (window - 1) // 2
    padded = np.r_[np.full(left, row[0]), row, np.full(window - 1 - left, row[-1])]
    return np.array([padded[i:i + window].mean() for i in range(len(row))])


def reference_kl(p, q, window, eps):
    out = []
    for row in q:
        pp, qq = p + eps, reference_smooth(row, window) + eps
        pp, qq = pp / pp.sum(), qq / qq.sum()
        out.append(np.sum(pp * np.log(pp / qq)) + np.sum(qq * np.log(qq / pp)))
    return np.array(out)


def reference_scores(train, test, repeats=7, distance=1.8, seed=0, bins=20, s1=4, s2=5, lambda_1=2.5, lambda_2=0.1):
    big_w, big_b = reference_perturbed(train.fc, repeats, distance, seed)
    z_train, z_test = train.features.double().numpy(), test.features.double().numpy()
    logits_train = (z_train.astype(np.float32) @ big_w.T.astype(np.float32) + big_b.astype(np.float32))
    logits_test = (z_test.astype(np.float32) @ big_w.T.astype(np.float32) + big_b.astype(np.float32))
    msp = softmax(logits_test.astype(np.float64).reshape(len(z_test), repeats, CLASSES), axis=2).max(axis=2).mean(1)
    low, high = z_train.min(), z_train.max()
    low_w, high_w = logits_train.min(), logits_train.max()
    p = reference_density(z_train, low, high, bins).mean(axis=0)
    p_w = reference_density(logits_train, low_w, high_w, bins).mean(axis=0)
    kl = reference_kl(p, reference_density(z_test, low, high, bins), s1, 0.01)
    kl_w = reference_kl(p_w, reference_density(logits_test, low_w, high_w, bins), s2, 0.025)
    return -(kl + lambda_1 * kl_w - lambda_2 * msp), msp


SETTING = {"n_repeats": 7, "n_bins": 20, "smoothing": 4, "smoothing_perturbed": 5}


def fitted(name, train, **params):
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(train, train)
    return method


def test_weiper_kld_is_the_reference_algorithm(data):
    train, test = data
    expected, _ = reference_scores(train, test)
    got = fitted("weiper_kld", train, **SETTING).score(test).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.std(expected) > 0.01
    assert expected[N_TEST // 2:].mean() < expected[:N_TEST // 2].mean()  # the shifted half scores lower


def test_weiper_is_the_mean_perturbed_msp(data):
    train, test = data
    _, msp = reference_scores(train, test, repeats=9, distance=2.2, seed=4)
    got = fitted("weiper", train, n_repeats=9, perturbation_distance=2.2, seed=4).score(test).numpy()
    np.testing.assert_allclose(got, msp, rtol=1e-6)


def test_grid_equals_one_by_one(data, monkeypatch):
    """Every combination of a grid, scored together (in blocks of combinations), bit for bit
    as on its own, and as the reference computes it."""
    train, test = data
    method = fitted("weiper_kld", train, **SETTING)
    combos = [{"smoothing": s1, "smoothing_perturbed": s2, "lambda_1": l1, "lambda_2": l2}
              for s1 in (1, 4, 30) for s2 in (5, 15) for l1 in (0.1, 4) for l2 in (0.25, 5)]
    together = method.score_grid(test, combos)
    monkeypatch.setattr(weiper, "BLOCK_ELEMENTS", 5 * len(test))  # 5 combinations a block
    assert all(torch.equal(a, b) for a, b in zip(together, method.score_grid(test, combos)))
    densities, perturbed = method.feature_densities(test), method.perturbed_densities(test)
    msp = method.perturbed_msp(test)
    for combo, scores in zip(combos, together):
        assert torch.equal(scores, method.with_params(combo).score(test))
        alone = -(weiper.symmetric_kl(method.train_density, densities, combo["smoothing"], weiper.EPS_FEATURES)
                  + combo["lambda_1"] * weiper.symmetric_kl(method.train_density_perturbed, perturbed,
                                                            combo["smoothing_perturbed"], weiper.EPS_PERTURBED)
                  - combo["lambda_2"] * msp)  # one combination with Python numbers, as before the blocks
        assert torch.equal(scores, alone)
        expected, _ = reference_scores(train, test, s1=combo["smoothing"], s2=combo["smoothing_perturbed"],
                                       lambda_1=combo["lambda_1"], lambda_2=combo["lambda_2"])
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_blocks_equal_one_shot(data, monkeypatch):
    train, test = data
    whole = fitted("weiper_kld", train, **SETTING).score(test)
    monkeypatch.setattr(weiper, "BLOCK_ELEMENTS", 3 * CLASSES * SETTING["n_repeats"])  # 3 rows a block
    # float32 products may round differently by block shape; histograms count the same values
    np.testing.assert_allclose(fitted("weiper_kld", train, **SETTING).score(test).numpy(), whole.numpy(), rtol=1e-5)


def test_edge_counts_is_bucketize_exactly():
    """The fast bin index against torch.bucketize: values on, just beside and outside every
    edge, NaN, +-inf, signed zeros, and degenerate or duplicated edges (the fallback)."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for trial in range(60):
        values = torch.randn(40, 25, generator=generator) * float(torch.rand(1, generator=generator) * 100)
        low, high = float(values.min()), float(values.max())
        if trial % 3 == 0:  # a narrower range: values outside both ends
            low, high = low / 2, high / 2
        cases.append((values, weiper.bin_edges(low, high, int(torch.randint(1, 120, (1,), generator=generator)))))
    cases += [(torch.linspace(low - 1, high + 1, 501), weiper.bin_edges(low, high, 50))
              for low, high in ((1.0, 1.0), (1e6, 1e6 + 1e-3), (0.0, 1e-30))]
    for values, edges in cases:
        beside = [edges.nextafter(edges.new_tensor(torch.inf)), edges.nextafter(edges.new_tensor(-torch.inf))]
        values = torch.cat([values.flatten(), edges, *beside, torch.tensor([torch.nan, torch.inf, -torch.inf, 0.0, -0.0])])
        assert torch.equal(weiper.edge_counts(values, edges), torch.bucketize(values, edges, right=True))


def test_reused_histograms_and_msp_equal_fresh_ones(data):
    """Fit on the validation split: its histograms are reused for its scores, and MSP~ is
    remembered per (features tensor, W~, b~); both give exactly the scores of a fresh pass,
    and a tensor changed in place is computed again."""
    train, _ = data
    copy = lambda o: Outputs(logits=o.logits.clone(), features=o.features.clone(), labels=o.labels, fc=o.fc)  # noqa: E731
    val = copy(train)
    method = POSTPROCESSORS.get("weiper_kld")(**SETTING)
    method.fit(train, val)
    assert "_val_histograms" not in method.fit_state()
    reused = method.score(val)
    weiper._MEMO.clear()
    assert torch.equal(reused, method.score(copy(val)))  # nothing reused for another tensor
    fresh = copy(val)
    first = method.score(fresh)
    fresh.features.mul_(2)  # in place: the remembered MSP~ no longer applies
    assert torch.equal(method.score(fresh), method.score(copy(fresh)))
    assert not torch.equal(method.score(fresh), first)


def test_remembered_msp_holds_no_classifier_and_serves_the_next_fit_of_a_delta(data, monkeypatch):
    """The memory of MSP~ knows features, W~ and b~ by their checksums: once a method is gone,
    so is its perturbed classifier (0.8 GB at ImageNet widths), and the next instance that
    draws the same W~ (a search's next n_bins at the same delta, WeiPer+KLD after WeiPer)
    reuses MSP~ without computing it, on the same features in any tensor; another delta or
    seed computes its own."""
    import gc
    import weakref as weakrefs

    train, val = data
    weiper._MEMO.clear()
    method = POSTPROCESSORS.get("weiper")(n_repeats=SETTING["n_repeats"])
    method.fit(train, val)
    first = method.score(val)
    assert "_perturbed_digest" not in method.fit_state()
    held = weakrefs.ref(method.perturbed_weight)
    del method
    gc.collect()
    assert held() is None
    computed = []
    monkeypatch.setattr(weiper, "mean_msp", lambda *a: computed.append(1) or torch.zeros(len(a[0])))
    again = POSTPROCESSORS.get("weiper")(n_repeats=SETTING["n_repeats"])
    again.fit(train, val)
    assert torch.equal(again.score(val), first) and not computed
    again.score(val).mul_(0)  # a caller changing its scores in place leaves the remembered MSP~ as it was
    assert torch.equal(again.score(val), first) and not computed
    same_content = Outputs(logits=val.logits, features=val.features.clone(), labels=val.labels, fc=val.fc)
    kld = POSTPROCESSORS.get("weiper_kld")(**SETTING)
    kld.fit(train, val)
    kld.score(same_content)  # WeiPer+KLD's MSP~ of the same draw, on equal features in another tensor
    assert not computed
    for other in ({"perturbation_distance": 2.0}, {"seed": 1}):
        method = POSTPROCESSORS.get("weiper")(n_repeats=SETTING["n_repeats"], **other)
        method.fit(train, val)
        method.score(val)
    assert len(computed) == 2


def test_train_densities_stream_in_blocks(data, monkeypatch):
    """A fit on another split than the scored one sums the train histograms block by block:
    in one block bit for bit their mean, in several the same to float64 rounding (the sums
    are added in another order); the validation split's histograms are kept only when the
    fit split is the validation split."""
    train, test = data

    def fitted_on_train():
        method = POSTPROCESSORS.get("weiper_kld")(**SETTING)
        method.fit(train, test)
        return method

    method = fitted_on_train()
    whole = (method.feature_densities(train).mean(dim=0), method.perturbed_densities(train).mean(dim=0))
    assert torch.equal(method.train_density, whole[0]) and torch.equal(method.train_density_perturbed, whole[1])
    assert method._val_histograms is None and fitted("weiper_kld", train, **SETTING)._val_histograms is not None
    monkeypatch.setattr(weiper, "BLOCK_ELEMENTS", 3 * CLASSES * SETTING["n_repeats"])  # 3 rows a block
    blocks = fitted_on_train()
    torch.testing.assert_close(blocks.train_density, whole[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(blocks.train_density_perturbed, whole[1], rtol=1e-12, atol=0)
