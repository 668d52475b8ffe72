"""The operating-point report: the threshold keeps 95% of ID validation by construction, the
counts add up, precision / recall / F1 match scikit-learn, and `oodbench report` runs on the
cached digits run with the stored hyperparameters."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

import oodbench
from oodbench.cli import main
from oodbench.metrics.detection import auroc, fpr_at_tpr, threshold_keeping
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.tasks.operating_point import model_operating_point, operating_point
from tests.conftest import digits_config


@pytest.mark.parametrize("size", [1, 19, 20, 21, 1000])
def test_threshold_keeps_95_percent_of_id_val(size):
    scores = np.random.default_rng(size).normal(size=size)
    threshold = threshold_keeping(scores)
    kept = np.mean(scores >= threshold)
    assert kept >= 0.95 and np.mean(scores > threshold) < 0.95  # the largest such threshold
    assert np.sum(scores >= threshold) == np.ceil(0.95 * size)


def test_threshold_with_ties_keeps_at_least_95_percent():
    scores = np.r_[np.full(10, 0.2), np.linspace(0.5, 1.0, 90)]  # the 95% point falls inside the tie
    threshold = threshold_keeping(scores)
    assert threshold == 0.2 and np.mean(scores >= threshold) == 1.0


def test_threshold_is_the_one_of_classic_fpr95():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1, 1, 500), rng.normal(0, 1, 300)
    threshold = threshold_keeping(id_scores)
    fpr = fpr_at_tpr(np.r_[id_scores, ood_scores], np.r_[np.zeros(500), np.ones(300)])
    assert np.mean(ood_scores >= threshold) == fpr


def test_report_counts_add_up_and_match_sklearn():
    rng = np.random.default_rng(1)
    id_scores, correct = rng.normal(1, 1, 200), rng.random(200) < 0.9
    ood = {"near:a": rng.normal(0.3, 1, 150), "far:b": rng.normal(-1, 1, 100)}
    report = operating_point(0.4, id_scores, correct, ood)
    accepted = id_scores >= 0.4
    assert report["id"]["accepted"] == accepted.sum()
    assert report["id"]["accuracy_accepted"] == correct[accepted].mean()
    for name, scores in ood.items():
        assert report["ood"][name]["rejected"] == np.sum(scores < 0.4)
        assert report["ood"][name]["rejected_share"] == np.mean(scores < 0.4)
    decisions = report["decisions"]
    total_rejected = sum(v["rejected"] for v in report["ood"].values())
    assert decisions["ID"]["support"] + decisions["OOD"]["support"] == 450
    # every sample is accepted or rejected: accepted ID + accepted OOD + rejected OOD + rejected ID = all
    predicted_id = decisions["ID"]["recall"] * 200 / decisions["ID"]["precision"]
    assert round(predicted_id) + total_rejected + (200 - report["id"]["accepted"]) == 450
    truth = np.r_[np.ones(200), np.zeros(250)]
    called = np.r_[accepted, np.concatenate(list(ood.values())) >= 0.4]
    precision, recall, f1, support = precision_recall_fscore_support(truth, called, labels=[1, 0])
    for index, key in enumerate(("ID", "OOD")):
        assert decisions[key]["precision"] == pytest.approx(precision[index])
        assert decisions[key]["recall"] == pytest.approx(recall[index])
        assert decisions[key]["f1"] == pytest.approx(f1[index])
        assert decisions[key]["support"] == support[index]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, session_cache):
    path = digits_config(tmp_path_factory.mktemp("operating"), postprocessors=["msp", "temp_scaling"])
    oodbench.run(path, cache_dir=str(session_cache), quiet=True)
    return CachedExperiment.open(path, cache_dir=str(session_cache))


def test_operating_point_on_the_cached_run(experiment):
    spec = experiment.config.models[0]
    report = model_operating_point(experiment, spec, "temp_scaling")
    method = experiment.fitted(spec, "temp_scaling")
    val = experiment.scores(method, spec, "id:val")
    assert np.mean(val >= report["threshold"]) >= 0.95 and np.mean(val > report["threshold"]) < 0.95
    test = experiment.outputs(spec, "id:test")
    assert report["id"]["samples"] == len(test)
    sizes = {split: len(experiment.outputs(spec, split)) for split in report["ood"]}
    assert {s: v["samples"] for s, v in report["ood"].items()} == sizes
    assert report["decisions"]["OOD"]["support"] == sum(sizes.values())
    stored = experiment.store.frame("results", model=spec.display, postprocessor="temp_scaling", metric="auroc")
    id_scores = experiment.scores(method, spec, "id:test")
    for split in report["ood"]:  # rescored from the cache with the stored params: the stored AUROC again
        ood_scores = experiment.scores(method, spec, split)
        value = auroc(np.r_[id_scores, ood_scores], np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)])
        assert value == pytest.approx(stored[stored.dataset == split.split(":", 1)[1]].value.item(), abs=1e-9)

def test_given_tau_is_used(experiment):
    spec = experiment.config.models[0]
    report = model_operating_point(experiment, spec, "msp", tau=0.999)
    test_scores = experiment.scores(experiment.fitted(spec, "msp"), spec, "id:test")
    assert report["threshold"] == 0.999
    assert report["id"]["accepted"] == np.sum(test_scores >= 0.999)


def test_report_command(experiment, capsys):
    args = ["report", experiment.config.source, "--operating-point", "--postprocessor", "msp",
            "--cache-dir", experiment.config.cache_dir]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "keeps 95% of ID validation" in out and "digits_6_9" in out and "| OOD" in out
    assert main([*args[:4], "gen", *args[5:]]) == 2  # no gen cell in this run
    assert "oodbench run" in capsys.readouterr().err
