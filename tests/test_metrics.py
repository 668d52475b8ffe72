"""Metrics against scikit-learn (the oracle, imported here only), on random, heavily tied
and edge-case scores; the one-pass bundle against the single-metric functions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from oodbench.metrics import detection as metrics


def labelled(id_scores, ood_scores):
    score = np.r_[np.asarray(id_scores, float), np.asarray(ood_scores, float)]
    return score, np.r_[np.zeros(len(id_scores), bool), np.ones(len(ood_scores), bool)]


def cases():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        n_id, n_ood = rng.integers(20, 400, size=2)
        score, is_ood = labelled(rng.normal(1, 1, n_id), rng.normal(0, 1, n_ood))
        if seed % 2:  # ties: scores on a coarse grid
            score = np.round(score * 2) / 2
        yield pytest.param(score, is_ood, id=f"seed{seed}{'-tied' if seed % 2 else ''}")
    rng = np.random.default_rng(10)
    yield pytest.param(*labelled(rng.integers(0, 6, 3000), rng.integers(-2, 4, 2000)), id="integers")
    # one ID and one OOD per value: diagonal ROC segments, whose inner points roc_curve drops
    yield pytest.param(*labelled(np.arange(100), np.arange(100)), id="paired-ties")
    yield pytest.param(*labelled(np.r_[np.arange(50), np.arange(60, 100)], np.r_[np.arange(50), 55]),
                       id="paired-ties-then-gap")
    rng = np.random.default_rng(11)
    yield pytest.param(*labelled(rng.normal(size=100_000), rng.normal(-0.5, 1, 80_000)), id="large")
    yield pytest.param(*labelled([0.3], rng.normal(size=40)), id="one-id")
    yield pytest.param(*labelled(rng.normal(size=40), [0.1]), id="one-ood")
    yield pytest.param(*labelled([1.0], [0.0]), id="one-each")
    yield pytest.param(np.zeros(50), np.r_[np.zeros(30, bool), np.ones(20, bool)], id="all-tied")
    yield pytest.param(*labelled(np.linspace(1, 2, 37), np.linspace(-1, 0, 23)), id="perfect")
    yield pytest.param(*labelled(np.linspace(-1, 0, 37), np.linspace(1, 2, 23)), id="reversed")
    shuffled = np.random.default_rng(12).permutation(500)
    score, is_ood = labelled(np.round(rng.normal(1, 1, 300)), np.round(rng.normal(0, 1, 200)))
    yield pytest.param(score[shuffled], is_ood[shuffled], id="interleaved-tied")


CASES = list(cases())


def sklearn_classic_fpr(score, is_ood, tpr=0.95):
    fpr, tpr_curve, _ = roc_curve(~is_ood, score, drop_intermediate=False)
    return fpr[np.argmax(tpr_curve >= tpr)]


def sklearn_openood_fpr(score, is_ood, tpr=0.95):
    fpr, tpr_curve, _ = roc_curve(is_ood, -score)
    return fpr[np.argmax(tpr_curve >= tpr)]


@pytest.mark.parametrize("score,is_ood", CASES)
def test_auroc_matches_sklearn(score, is_ood):
    assert metrics.auroc(score, is_ood) == pytest.approx(roc_auc_score(~is_ood, score), rel=0, abs=1e-12)
    # symmetric in which class is positive
    assert metrics.auroc(score, is_ood) == pytest.approx(roc_auc_score(is_ood, -score), rel=0, abs=1e-12)


def test_auroc_rows_equal_auroc_bit_for_bit_and_sklearn():
    """A search's batched AUROCs: each row as `auroc` gives it (exact equality, ties included),
    and as scikit-learn's roc_auc_score to rounding."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        rows, num_id, num_ood = rng.integers(1, 6), rng.integers(1, 60), rng.integers(1, 60)
        if trial % 2:  # few distinct values: runs of ties within and across ID and OOD
            id_scores, ood_scores = rng.integers(0, 5, (rows, num_id)) / 4, rng.integers(0, 5, (rows, num_ood)) / 4
        else:
            id_scores, ood_scores = rng.normal(1, 1, (rows, num_id)), rng.normal(0, 1, (rows, num_ood))
            if trial % 4 == 2:  # one tie across ID and OOD in some rows: at the top, the bottom, or inside
                for row in range(0, rows, 2):
                    ood_scores[row, rng.integers(num_ood)] = id_scores[row, rng.integers(num_id)]
                id_scores[-1, 0] = ood_scores[-1].max() if trial % 8 == 2 else ood_scores[-1].min()
        labels = np.r_[np.zeros(num_id, bool), np.ones(num_ood, bool)]
        got = metrics.auroc_rows(id_scores, ood_scores)
        for row, value in enumerate(got):
            score = np.r_[id_scores[row], ood_scores[row]]
            assert value == metrics.auroc(score, labels)
            assert value == pytest.approx(roc_auc_score(~labels, score), abs=1e-12)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_classic_fpr95_matches_sklearn_roc(score, is_ood):
    assert metrics.fpr_at_tpr(score, is_ood) == pytest.approx(sklearn_classic_fpr(score, is_ood), rel=0, abs=1e-12)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_classic_fpr95_definition(score, is_ood):
    """The threshold keeps at least 95% of ID; the FPR is the OOD share at or above it."""
    value = metrics.fpr_at_tpr(score, is_ood)
    id_scores, ood_scores = score[~is_ood], score[is_ood]
    values, ranked = np.unique(id_scores), np.sort(id_scores)
    share_at_or_above = (ranked.size - np.searchsorted(ranked, values, side="left")) / ranked.size
    threshold = values[share_at_or_above >= 0.95].max()
    assert threshold == metrics.threshold_keeping(id_scores)
    assert value == pytest.approx(np.mean(ood_scores >= threshold), rel=0, abs=1e-12)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_openood_fpr95_matches_sklearn(score, is_ood):
    expected = sklearn_openood_fpr(score, is_ood)
    assert metrics.fpr_at_tpr_openood(score, is_ood) == pytest.approx(expected, rel=0, abs=1e-12)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_aupr_matches_sklearn(score, is_ood):
    assert metrics.aupr_in(score, is_ood) == pytest.approx(average_precision_score(~is_ood, score), rel=0, abs=1e-12)
    assert metrics.aupr_out(score, is_ood) == pytest.approx(average_precision_score(is_ood, -score), rel=0, abs=1e-12)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_one_pass_bundle_matches_sklearn(score, is_ood):
    bundle = metrics.ood_metrics(score[~is_ood], score[is_ood])
    expected = {
        "fpr95": sklearn_classic_fpr(score, is_ood),
        "fpr95_openood": sklearn_openood_fpr(score, is_ood),
        "auroc": roc_auc_score(~is_ood, score),
        "aupr_in": average_precision_score(~is_ood, score),
        "aupr_out": average_precision_score(is_ood, -score),
    }
    assert bundle == pytest.approx(expected, rel=0, abs=1e-12)
    assert all(type(value) is float for value in bundle.values())


def openood_aupr(score, is_ood):
    """OpenOOD v1.5's evaluators/metrics.py: auc(recall, precision) of precision_recall_curve."""
    precision_in, recall_in, _ = precision_recall_curve(~is_ood, score)
    precision_out, recall_out, _ = precision_recall_curve(is_ood, -score)
    return auc(recall_in, precision_in), auc(recall_out, precision_out)


@pytest.mark.parametrize("score,is_ood", CASES)
def test_trapezoid_aupr_is_openoods_rule(score, is_ood):
    expected_in, expected_out = openood_aupr(score, is_ood)
    assert metrics.aupr_in_trapezoid(score, is_ood) == pytest.approx(expected_in, rel=0, abs=1e-12)
    assert metrics.aupr_out_trapezoid(score, is_ood) == pytest.approx(expected_out, rel=0, abs=1e-12)
    bundle = metrics.ood_metrics(score[~is_ood], score[is_ood], aupr="trapezoid")
    assert (bundle["aupr_in"], bundle["aupr_out"]) == pytest.approx((expected_in, expected_out), rel=0, abs=1e-12)


def test_paired_ties_make_the_dropped_roc_points_matter():
    """On diagonal ROC segments the OpenOOD FPR@95 depends on roc_curve dropping the inner
    points: the case above tests something only if the kept and the full curve disagree."""
    score, is_ood = labelled(np.arange(100), np.arange(100))
    fpr, tpr, _ = roc_curve(is_ood, -score, drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] != sklearn_openood_fpr(score, is_ood)


def test_conventions_differ_where_they_should():
    # ID scores spread wide, OOD concentrated: the two FPR@95 conventions disagree.
    score = np.r_[np.linspace(0, 10, 100), np.full(100, 0.55)]
    is_ood = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    assert metrics.fpr_at_tpr(score, is_ood) == 1.0  # every OOD sits above the ID 5% quantile
    assert metrics.fpr_at_tpr_openood(score, is_ood) == pytest.approx(0.06)  # 6 ID scores <= 0.55


def test_accuracy_and_ood_metrics_bundle():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert metrics.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    bundle = metrics.ood_metrics([3.0, 2.0, 1.0], [0.0, 1.5])
    assert set(bundle) == {"fpr95", "fpr95_openood", "auroc", "aupr_in", "aupr_out"}
    assert bundle["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [3, 2, 1, 0, 1.5]))


def test_ece_hand_computation():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.55 -> bin 8
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_metrics_need_both_classes():
    with pytest.raises(ValueError):
        metrics.auroc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError):
        metrics.ood_metrics([1.0, 2.0], [])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused_as_sklearn_refuses_them(bad):
    with pytest.raises(ValueError):
        roc_auc_score([0, 1, 1], [0.5, bad, 0.1])
    with pytest.raises(ValueError, match="1 of 3 scores are NaN or infinite"):
        metrics.ood_metrics([0.5, bad], [0.1])


def test_importing_the_metrics_does_not_import_sklearn_or_scipy():
    code = ("import sys, oodbench.metrics.detection; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
