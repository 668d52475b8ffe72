"""Failure detection: AURC / E-AURC against a brute-force loop over every threshold, AUGRC
against its closed form through scikit-learn's AUROC (Traub et al. 2024), the failure
AUROC / FPR@95 against scikit-learn; DOCTOR against its formula; `oodbench failure` on a
cached digits run, from the scores the run stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import oodbench
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.cli import main
from oodbench.tasks import failure
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS
from oodbench.report import plots
from tests.conftest import digits_config


def cases() -> list:
    return list(_cases())


def _cases():
    for seed in range(4):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(30, 500))
        correct = rng.random(n) < rng.uniform(0.5, 0.95)
        score = rng.normal(size=n) + 1.5 * correct
        if seed % 2:  # ties: a coarse grid
            score = np.round(score * 2) / 2
        yield pytest.param(score, correct, id=f"seed{seed}{'-tied' if seed % 2 else ''}")
    yield pytest.param(np.zeros(20), np.arange(20) % 3 > 0, id="all-tied")
    yield pytest.param(np.arange(10.0), np.arange(10) >= 3, id="perfect")
    yield pytest.param(np.arange(10.0), np.arange(10) < 7, id="reversed")


def brute_force_curve(score, correct):
    """(coverage, selective risk, generalized risk) at each distinct threshold, by a loop."""
    points = []
    for t in np.unique(score):
        accepted = score >= t
        points.append((accepted.mean(), (accepted & ~correct).sum() / accepted.sum(), (accepted & ~correct).mean()))
    return np.array(sorted(points, reverse=True))


@pytest.mark.parametrize("score, correct", cases())
def test_aurc_and_eaurc_against_a_brute_force_loop(score, correct):
    curve = brute_force_curve(score, correct)
    coverage = np.r_[curve[:, 0], 0.0]
    risk = np.r_[curve[:, 1], curve[-1, 1]]  # flat to coverage 0, as FD-Shifts
    expected = np.trapezoid(risk[::-1], coverage[::-1])
    assert failure.aurc(score, correct) == pytest.approx(expected, abs=1e-12)
    error = 1 - correct.mean()
    optimum = error + (1 - error) * np.log(1 - error)
    assert failure.eaurc(score, correct) == pytest.approx(expected - optimum, abs=1e-12)


@pytest.mark.parametrize("score, correct", cases())
def test_augrc_is_its_closed_form_through_sklearn_auroc(score, correct):
    curve = brute_force_curve(score, correct)
    expected = np.trapezoid(np.r_[curve[:, 2], 0.0][::-1], np.r_[curve[:, 0], 0.0][::-1])
    assert failure.augrc(score, correct) == pytest.approx(expected, abs=1e-12)
    acc = correct.mean()
    if 0 < acc < 1:  # Traub et al. 2024: AUGRC = (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2
        closed = (1 - roc_auc_score(correct, score)) * acc * (1 - acc) + (1 - acc) ** 2 / 2
        assert failure.augrc(score, correct) == pytest.approx(closed, abs=1e-12)


@pytest.mark.parametrize("score, correct", cases())
def test_failure_auroc_and_fpr_against_sklearn(score, correct):
    metrics = failure.failure_metrics(score, correct)
    assert metrics["acc"] == correct.mean()
    if correct.all() or not correct.any():
        assert np.isnan(metrics["auroc"]) and np.isnan(metrics["fpr95"])
        return
    assert metrics["auroc"] == pytest.approx(roc_auc_score(correct, score), abs=1e-12)
    fpr, tpr, _ = roc_curve(correct, score)
    assert metrics["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert metrics["aurc"] == failure.aurc(score, correct) and metrics["augrc"] == failure.augrc(score, correct)


def test_perfect_ranking_reaches_the_optimum_and_a_reversed_one_is_worse():
    correct = np.arange(1000) >= 100  # error rate 0.1
    score = np.arange(1000.0)
    assert failure.eaurc(score, correct) == pytest.approx(0.0, abs=2e-3)  # discrete vs continuous optimum
    assert failure.augrc(score, correct) == pytest.approx(0.1 ** 2 / 2)
    # all the wrong ones first: risk 1 up to coverage 0.1, then 0.1 / c
    assert failure.aurc(-score, correct) == pytest.approx(0.1 + 0.1 * np.log(10), abs=2e-3)


def test_bad_input_is_one_readable_error():
    with pytest.raises(ValueError, match="NaN"):
        failure.aurc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="3 scores for 2"):
        failure.augrc([0.1, 0.2, 0.3], [True, False])


@pytest.mark.parametrize("variant", ["alpha", "beta"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_doctor_is_its_formula(variant, temperature):
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0)) * 3
    f = logits.double().numpy() / temperature
    p = np.exp(f - f.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = (p ** 2).sum(axis=1) if variant == "alpha" else p.max(axis=1)
    expected = -(1 - g) / g  # D_alpha or D_beta of Granese et al. 2021, negated (higher = confident)
    got = POSTPROCESSORS.get("doctor")(temperature=temperature, variant=variant).score(Outputs(logits=logits))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


WEAK_NET = """
from torch import nn


class Weak(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, session_cache):
    """A digits run of an untrained network (seeded weights): the digits CNNs make no error. Its
    BatchNorm feeds the penultimate features, so BATS runs too (the model's weights are read)."""
    folder = tmp_path_factory.mktemp("failure")
    (folder / "weak.py").write_text(WEAK_NET)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 6))
    torch.nn.init.uniform_(net[2].weight, 0.05, 0.3)  # BATS's bounds then clip (its BatchNorm is the last one)
    torch.save(net.state_dict(), folder / "weak.pt")
    model = {"name": f"torch:{folder / 'weak.pt'}", "options": {"module": f"{folder / 'weak.py'}:Weak"}}
    path = digits_config(folder, postprocessors=["msp", "doctor", "ebo", "knn", "bats"], models=[model])
    oodbench.run(path, cache_dir=str(session_cache), quiet=True)
    return CachedExperiment.open(path, cache_dir=str(session_cache))


def test_failure_table_reads_the_stored_scores(experiment):
    frame, curves = failure.experiment_failure(experiment)
    spec = experiment.config.models[0]
    test = experiment.outputs(spec, "id:test")
    correct = test.predictions.numpy() == test.labels.numpy()
    assert 0 < correct.mean() < 1, "no wrong (or no right) prediction: the failure metrics are undefined"
    assert list(frame.postprocessor) == ["msp", "doctor", "ebo", "knn", "bats"] and set(curves) == {
        (spec.display, n) for n in frame.postprocessor}
    for row in frame.itertuples():  # the stored scores are the method's scores, recomputed here
        scores = experiment.scores(experiment.fitted(spec, row.postprocessor), spec, "id:test")
        np.testing.assert_allclose(experiment.stored_scores(spec, row.postprocessor), scores, rtol=1e-6)
        assert row.aurc == pytest.approx(failure.aurc(scores, correct), abs=1e-9)
        assert row.auroc == pytest.approx(roc_auc_score(correct, scores), abs=1e-9)
        assert row.acc == correct.mean()


def test_failure_command_writes_table_and_plot(experiment, tmp_path, capsys, monkeypatch):
    saved = []
    original = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, stem: saved.append(fig) or original(fig, out, stem))
    args = ["failure", experiment.config.source, "--cache-dir", experiment.config.cache_dir, "--output",
            str(tmp_path)]
    assert main([*args, "--sort", "auroc"]) == 0
    out = capsys.readouterr().out
    assert " AURC |" in out and "x1000" in out and "| doctor " in out
    rows = [line for line in out.splitlines() if line.startswith("| torch:")]
    auroc = [float(line.split("|")[7]) for line in rows]
    assert len(rows) == 5 and auroc == sorted(auroc, reverse=True)  # best AUROC_f first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failure_digits.csv", "failure_digits.pdf",
                                                         "failure_digits.png"]
    (figure,) = saved
    default = ["failure", experiment.config.source, "--cache-dir", experiment.config.cache_dir]
    assert main(default) == 0  # no --output: plots/ beside the results store, where the HTML page looks
    beside = Path(experiment.config.results).parent / "plots"
    assert {"failure_digits.png", "failure_digits.csv"} <= {p.name for p in beside.iterdir()}
    capsys.readouterr()
    axes = figure.axes
    assert len(axes) == 2 and all(ax.get_xlabel().startswith("coverage") for ax in axes)
    frame, curves = failure.experiment_failure(experiment)
    for line in axes[1].get_lines()[:-1]:  # the generalized risk's trapezoid area is the AUGRC
        x, y = line.get_data()
        row = frame[frame.postprocessor == line.get_label()].iloc[0]
        assert -np.trapezoid(y / 100, x) == pytest.approx(row.augrc, abs=1e-12)
    assert main([*args, "--postprocessor", "gen"]) == 2  # not a method of this run
    assert "not a postprocessor of" in capsys.readouterr().err
    assert main([*args, "--models", f"{experiment.config.models[0].display},resnet99"]) == 2  # one of two unknown
    assert "'resnet99' is not a model of" in capsys.readouterr().err


def test_failure_before_a_run_says_to_run_first(tmp_path, capsys, session_cache):
    path = digits_config(tmp_path, postprocessors=["msp"], models=[{"name": "digits-cnn"}])
    assert main(["failure", str(path), "--cache-dir", str(session_cache), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "oodbench run" in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["csv", "json", "latex"])
def test_failure_command_exports(experiment, tmp_path, capsys, fmt):
    import io

    import pandas as pd

    args = ["failure", experiment.config.source, "--cache-dir", experiment.config.cache_dir, "--output",
            str(tmp_path), "--format", fmt]
    assert main(args) == 0
    out = capsys.readouterr().out
    frame, _ = failure.experiment_failure(experiment)
    if fmt == "latex":
        assert r"\begin{tabular}" in out and r"\end{table}" in out and "E-AURC" in out
        return
    read = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.read_json(io.StringIO(out))
    assert list(read.columns) == ["model", "postprocessor", *failure.FAILURE_FRAME_METRICS]
    np.testing.assert_allclose(read.aurc, frame.aurc, rtol=1e-12)


def test_a_model_without_wrong_predictions_is_said_to_have_nothing_to_detect():
    """A model right on every ID test image has no failure AUROC / FPR (NaN): the table says why."""
    from oodbench.report.failure import render_failure

    rows = [{"model": "perfect", "postprocessor": "msp", "acc": 1.0, "aurc": 0.0, "eaurc": 0.0, "augrc": 0.0,
             "auroc": np.nan, "fpr95": np.nan},
            {"model": "other", "postprocessor": "msp", "acc": 0.9, "aurc": 0.02, "eaurc": 0.01, "augrc": 0.01,
             "auroc": 0.8, "fpr95": 0.5}]
    text = render_failure(pd.DataFrame(rows))
    assert "No wrong prediction by perfect on ID test" in text and "by other" not in text
    assert "No wrong prediction" not in render_failure(pd.DataFrame(rows[1:]))
