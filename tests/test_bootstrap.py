"""The vectorised bootstrap against a slow one written with scikit-learn (same resamples,
replicate by replicate) and against the analytic variance of AUROC (Hanley & McNeil,
1982) on large samples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from oodbench.metrics import bootstrap
from oodbench.metrics.bootstrap import (bootstrap_replicates, interval, not_significant, resample_counts, resample_indices, stream_of)


def slow_reference(id_scores, ood_scores, resamples, seed, fpr):
    """One resample at a time: draw the indices, then scikit-learn's ROC on the drawn scores."""
    out = {"auroc": [], "fpr": []}
    for b in range(resamples):
        ids = id_scores[resample_indices(id_scores.size, b, seed, stream_of("id_test", id_scores.size))]
        oods = ood_scores[resample_indices(ood_scores.size, b, seed, stream_of("ood", ood_scores.size))]
        score = np.r_[ids, oods]
        is_ood = np.r_[np.zeros(ids.size, bool), np.ones(oods.size, bool)]
        out["auroc"].append(roc_auc_score(~is_ood, score))
        if fpr == "classic":  # ID positive: first ROC point keeping >= 95% of ID
            false_pos, true_pos, _ = roc_curve(~is_ood, score, drop_intermediate=False)
        else:  # OpenOOD v1.5: OOD positive, fpr[argmax(tpr >= 0.95)]
            false_pos, true_pos, _ = roc_curve(is_ood, -score)
        out["fpr"].append(false_pos[np.argmax(true_pos >= 0.95)])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("fpr,ties", [("classic", True), ("classic", False), ("openood", False)])
def test_matches_a_slow_scikit_learn_bootstrap(fpr, ties):
    rng = np.random.default_rng(3)
    methods = {}
    for key, shift in (("a", 0.5), ("b", 1.0), ("c", 2.0)):
        id_scores, ood_scores = rng.normal(shift, 1, 57), rng.normal(0, 1, 41)
        if ties:  # few distinct values: ties within and across ID and OOD
            id_scores, ood_scores = np.round(id_scores * 2), np.round(ood_scores * 2)
        methods[key] = (id_scores, ood_scores)
    fast = bootstrap_replicates({k: v[0] for k, v in methods.items()}, {k: {"ood": v[1]} for k, v in methods.items()},
                                resamples=150, seed=11, fpr=fpr)
    for key, (id_scores, ood_scores) in methods.items():
        slow = slow_reference(id_scores, ood_scores, 150, 11, fpr)
        np.testing.assert_allclose(fast[key]["ood"]["auroc"], slow["auroc"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(fast[key]["ood"]["fpr"], slow["fpr"], rtol=0, atol=1e-12)


def test_resamples_do_not_depend_on_batching(monkeypatch):
    rng = np.random.default_rng(0)
    id_scores, ood = {"m": rng.normal(1, 1, 300)}, {"m": {"x": rng.normal(0, 1, 200), "y": rng.normal(0, 2, 100)}}
    whole = bootstrap_replicates(id_scores, ood, resamples=50, seed=5)
    monkeypatch.setattr(bootstrap, "CHUNK_ELEMENTS", 700)  # batches of 2 resamples
    batched = bootstrap_replicates(id_scores, ood, resamples=50, seed=5)
    for name in ("x", "y"):
        for metric in ("auroc", "fpr"):
            np.testing.assert_array_equal(whole["m"][name][metric], batched["m"][name][metric])
    other_seed = bootstrap_replicates(id_scores, ood, resamples=50, seed=6)
    assert not np.array_equal(whole["m"]["x"]["auroc"], other_seed["m"]["x"]["auroc"])


def test_counts_draw_each_set_whole_with_replacement():
    counts = resample_counts(1000, range(200), seed=0, stream=stream_of("id_test", 1000))
    assert counts.shape == (1000, 200) and (counts.sum(axis=0) == 1000).all()
    # each image is drawn Binomial(1000, 1/1000) times: mean 1, and ~36.8% are never drawn
    assert counts.mean() == pytest.approx(1.0)
    assert (counts == 0).mean() == pytest.approx((1 - 1 / 1000) ** 1000, abs=0.01)


def hanley_mcneil_se(area: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    return float(np.sqrt((area * (1 - area) + (n_pos - 1) * (q1 - area**2) + (n_neg - 1) * (q2 - area**2))
                         / (n_pos * n_neg)))


@pytest.mark.parametrize("n_id,n_ood,rate_ood", [(2000, 2000, 3.0), (3000, 1200, 1.5)])
def test_auroc_spread_matches_hanley_mcneil(n_id, n_ood, rate_ood):
    # exponential scores: Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A) hold exactly, so the formula
    # is the exact variance of the empirical AUROC
    rng = np.random.default_rng(7)
    id_scores, ood_scores = rng.exponential(1.0, n_id), rng.exponential(1 / rate_ood, n_ood)
    area = rate_ood / (1 + rate_ood)  # P(ID score > OOD score)
    reps = bootstrap_replicates({"m": id_scores}, {"m": {"ood": ood_scores}}, resamples=1000, seed=1)["m"]["ood"]
    expected = hanley_mcneil_se(area, n_id, n_ood)
    assert reps["auroc"].std(ddof=1) == pytest.approx(expected, rel=0.10)
    low, high = interval(reps["auroc"])
    assert high - low == pytest.approx(2 * 1.959964 * expected, rel=0.15)
    assert low < roc_auc_score(np.r_[np.ones(n_id), np.zeros(n_ood)], np.r_[id_scores, ood_scores]) < high


def test_paired_difference_tells_noise_from_a_real_gap():
    rng = np.random.default_rng(2)
    id_base, ood_base = rng.normal(1.5, 1, 2000), rng.normal(0, 1, 2000)
    methods = {
        "best": (id_base, ood_base),
        "near_copy": (id_base + rng.normal(0, 0.05, 2000), ood_base + rng.normal(0, 0.05, 2000)),
        "worse": (id_base - 0.4, ood_base),  # a real drop in AUROC and rise in FPR
    }
    reps = bootstrap_replicates({k: v[0] for k, v in methods.items()}, {k: {"o": v[1]} for k, v in methods.items()},
                                resamples=400, seed=0)
    auroc = {k: reps[k]["o"]["auroc"] for k in methods}
    assert not_significant(auroc["best"], auroc["near_copy"], higher_is_better=True)
    assert not not_significant(auroc["best"], auroc["worse"], higher_is_better=True)
    # the paired difference is far tighter than the two unpaired intervals suggest
    spread = np.std(auroc["best"] - auroc["near_copy"])
    assert spread < 0.2 * np.std(auroc["best"])
    fpr = {k: reps[k]["o"]["fpr"] for k in methods}
    assert not not_significant(fpr["best"], fpr["worse"], higher_is_better=False)


def test_reference_significance_by_hand():
    best = np.array([0.9, 0.91, 0.92, 0.93, 0.94] * 40)
    other = best - np.linspace(-0.001, 0.02, best.size)  # 2.5% quantile of the difference < 0
    difference = best - other
    assert np.quantile(difference, 0.025) <= 0
    assert not_significant(best, other, higher_is_better=True)
    assert not not_significant(best, best - 0.01, higher_is_better=True)
    assert not_significant(1 - best, 1 - best + 0.0, higher_is_better=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fpr"):
        bootstrap_replicates({"m": np.ones(3)}, {"m": {"o": np.zeros(3)}}, fpr="other")
    with pytest.raises(ValueError, match="finite"):
        bootstrap_replicates({"m": np.array([1.0, np.nan])}, {"m": {"o": np.zeros(3)}})
