"""Logit-noise calibration robustness: exact at s = 0, ECE and NLL against hand computations,
the noise scale and its seed, and `oodbench calibration` end to end on the cached digits run."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

import oodbench
from oodbench.cli import main
from oodbench.tasks.calibration import calibration_under_noise, id_metrics, noise_levels, noisy_logits
from oodbench.metrics.detection import accuracy, auroc, expected_calibration_error
from oodbench.report import plots
from oodbench.storage.store import ResultStore
from oodbench.report.tidy import COLUMNS as TIDY_COLUMNS
from tests.conftest import digits_config


def synthetic(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (400,), generator=generator)
    logits = torch.randn(400, 5, generator=generator) * 2
    logits[torch.arange(400), labels] += 2.5
    ood = {"near:a": torch.randn(300, 5, generator=generator) * 2,
           "far:b": torch.randn(200, 5, generator=generator), "far:c": torch.randn(100, 5, generator=generator) * 3}
    return logits, labels, ood, {"near:a": "near", "far:b": "far", "far:c": "far"}


def test_default_levels_are_linspace_0_2_10():
    np.testing.assert_array_equal(noise_levels(), np.linspace(0, 2, 10))


def test_zero_noise_equals_the_clean_metrics_exactly():
    logits, labels, ood, groups = synthetic()
    row = calibration_under_noise(logits, labels, ood, groups, levels=[0.0, 1.0], seed=3).iloc[0]
    assert row.acc == accuracy(logits.numpy(), labels.numpy())
    assert row.ece == expected_calibration_error(torch.softmax(logits.double(), dim=1).numpy(), labels.numpy(), 15)
    msp = lambda l: torch.softmax(l.double(), dim=1).max(dim=1).values.numpy()  # noqa: E731
    clean = {n: auroc(np.r_[msp(logits), msp(o)], np.r_[np.zeros(len(logits)), np.ones(len(o))]) for n, o in ood.items()}
    assert row.auroc_near == clean["near:a"]
    assert row.auroc_far == pytest.approx((clean["far:b"] + clean["far:c"]) / 2, abs=1e-15)


def test_ece_and_nll_against_a_hand_computation():
    probs = torch.tensor([[0.95, 0.05 / 3, 0.05 / 3, 0.05 / 3],   # conf 0.95, correct   -> bin 14
                          [0.95, 0.05 / 3, 0.05 / 3, 0.05 / 3],   # conf 0.95, wrong     -> bin 14
                          [0.50, 0.30, 0.10, 0.10],               # conf 0.50, correct   -> bin 7
                          [0.30, 0.25, 0.25, 0.20]], dtype=torch.float64)  # conf 0.30, wrong -> bin 4
    labels = torch.tensor([0, 1, 0, 1])
    metrics = id_metrics(probs.log(), labels)
    # bin 14: 2/4 * |0.5 - 0.95|; bin 7: 1/4 * |1 - 0.5|; bin 4: 1/4 * |0 - 0.3|
    assert metrics["ece"] == pytest.approx(0.5 * 0.45 + 0.25 * 0.5 + 0.25 * 0.3, abs=1e-12)
    assert metrics["acc"] == 0.5
    assert metrics["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.05 / 3) + math.log(0.5) + math.log(0.25)) / 4)


def test_noise_is_reproducible_with_the_seed():
    logits, labels, ood, groups = synthetic()
    first = calibration_under_noise(logits, labels, ood, groups, seed=7)
    pd.testing.assert_frame_equal(first, calibration_under_noise(logits, labels, ood, groups, seed=7))
    other = calibration_under_noise(logits, labels, ood, groups, seed=8)
    pd.testing.assert_series_equal(first.iloc[0], other.iloc[0])  # s = 0: no noise
    assert not np.allclose(first.nll.iloc[1:], other.nll.iloc[1:])
    assert torch.equal(noisy_logits(logits, 0.5, 7, 2, "id:test"), noisy_logits(logits, 0.5, 7, 2, "id:test"))


def test_noise_std_is_s_times_the_std_of_the_logits():
    logits = torch.randn(2000, 10, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for level in (0.5, 2.0):
        noise = noisy_logits(logits, level, seed=0, level_index=1, split="id:test") - logits.double()
        assert noise.std().item() == pytest.approx(level * logits.double().std().item(), rel=0.02)
        assert abs(noise.mean().item()) < 0.05 * level * logits.std().item()


def test_noise_hurts_accuracy_and_detection():
    logits, labels, ood, groups = synthetic()
    frame = calibration_under_noise(logits, labels, ood, groups, seed=0)
    assert frame.acc.iloc[-1] < frame.acc.iloc[0] and frame.nll.iloc[-1] > frame.nll.iloc[0]
    assert frame.auroc_near.iloc[-1] < frame.auroc_near.iloc[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, session_cache):
    folder = tmp_path_factory.mktemp("calibration")
    path = digits_config(folder, postprocessors=["msp"], models=[
        {"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn", "label": "digits-cnn-copy", "tags": ["robust"]}])
    oodbench.run(path, cache_dir=str(session_cache), quiet=True)
    return path, folder


def test_calibration_command_on_the_cached_run(digits_run, session_cache, tmp_path, capsys):
    path, folder = digits_run
    assert main(["calibration", str(path), "--cache-dir", str(session_cache), "--levels", "4",
                 "--output", str(tmp_path)]) == 0
    assert "MSP AUROC near" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "calibration_digits.csv")
    assert list(frame.level.unique()) == pytest.approx([0, 2 / 3, 4 / 3, 2])
    assert len(frame) == 8 and set(frame.model) == {"digits-cnn", "digits-cnn-copy"}
    stored = ResultStore(folder / "results.sqlite", readonly=True).frame(
        "results", model="digits-cnn", postprocessor="msp")
    clean = frame[(frame.model == "digits-cnn") & (frame.level == 0)].iloc[0]
    assert clean.acc == pytest.approx(stored[stored.metric == "acc"].value.item(), abs=1e-6)
    assert clean.auroc_near == pytest.approx(stored[(stored.dataset == "digits_6_9") & (stored.metric == "auroc")]
                                             .value.item(), abs=1e-6)
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"calibration_digits.{suffix}").stat().st_size > 0
    figure = plots.calibration_figure(frame)
    assert len(figure.axes) == 4  # 2x2: acc, ece, nll, auroc (near and far lines)
    models = ["digits-cnn", "digits-cnn-copy"]
    for ax in figure.axes[:3]:
        assert [line.get_label() for line in ax.get_lines()] == models
    assert [line.get_label() for line in figure.axes[3].get_lines()] == [
        f"{m}, {g}-OOD" for m in models for g in ("near", "far")]
    assert all(len(line.get_xdata()) == 4 for ax in figure.axes for line in ax.get_lines())


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_calibration_tidy_export_loads_as_it_is(digits_run, session_cache, tmp_path, capsys, fmt):
    path, _ = digits_run
    assert main(["calibration", str(path), "--cache-dir", str(session_cache), "--levels", "3", "--format", fmt,
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tidy = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.read_json(io.StringIO(out))
    assert list(tidy.columns) == TIDY_COLUMNS + ["noise_s"]
    figure_table = pd.read_csv(tmp_path / "calibration_digits.csv")  # the same numbers, one column each
    assert len(tidy) == len(figure_table) * 5  # acc, ece, nll, MSP AUROC near and far
    for row in figure_table.itertuples():
        mine = tidy[(tidy.model == row.model) & np.isclose(tidy.noise_s, row.level)]
        for metric in ("acc", "ece", "nll"):
            assert mine[mine.metric == metric].value.item() == pytest.approx(getattr(row, metric), rel=1e-9)
        near = mine[(mine.metric == "auroc") & (mine.dataset == "near-OOD")]
        assert near.value.item() == pytest.approx(row.auroc_near, rel=1e-9) and near.postprocessor.item() == "msp"
    direction = dict(zip(tidy.metric, tidy.higher_is_better))
    assert direction == {"acc": True, "ece": False, "nll": False, "auroc": True}
