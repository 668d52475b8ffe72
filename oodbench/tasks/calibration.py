"""Logit-noise calibration robustness: how accuracy, calibration and MSP detection hold
up when Gaussian noise is added to the logits.

For each noise level s (default ``linspace(0, 2, 10)``), every split's cached logits f
get ``f + s * std(f) * N(0, 1)`` noise, where std(f) is the standard deviation over all
entries of that split's logits (the split is the batch). The noise is drawn from a
generator seeded by (seed, level index, split name), so a level's result is reproducible
and independent of the other levels. At s = 0 the logits are unchanged, so the row
equals the clean accuracy and ECE exactly.

Per model and level: top-1 accuracy, ECE (15 equal-width bins), NLL on ID test, and the
MSP AUROC of ID test against each OOD group (the unweighted mean over the group's sets,
as in the leaderboard's near/far columns). Everything is computed from the output cache.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import torch

from oodbench.metrics.detection import accuracy, auroc, expected_calibration_error
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

LEVELS = 10
MAX_LEVEL = 2.0
ECE_BINS = 15


def noise_levels(count: int = LEVELS, high: float = MAX_LEVEL) -> np.ndarray:
    return np.linspace(0.0, high, count)


def noisy_logits(logits: torch.Tensor, level: float, seed: int, level_index: int, split: str) -> torch.Tensor:
    """`logits` (float64) plus N(0, (level * std(logits))^2) noise, seeded per (seed, level, split)."""
    logits = logits.double()
    rng = np.random.default_rng([seed, level_index, zlib.crc32(split.encode())])
    noise = torch.from_numpy(rng.standard_normal(tuple(logits.shape)))
    return logits + level * logits.std() * noise


def id_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, ECE and NLL of float64 logits."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    return {
        "acc": accuracy(logits.numpy(), labels.numpy()),
        "ece": expected_calibration_error(log_probs.exp().numpy(), labels.numpy(), bins=ECE_BINS),
        "nll": float(-log_probs.gather(1, labels.view(-1, 1)).mean()),
    }


def msp_auroc(id_logits: torch.Tensor, ood_logits: torch.Tensor) -> float:
    msp = POSTPROCESSORS.get("msp")()
    id_scores = msp.score(Outputs(logits=id_logits)).numpy()
    ood_scores = msp.score(Outputs(logits=ood_logits)).numpy()
    return auroc(np.r_[id_scores, ood_scores], np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)])


def calibration_under_noise(id_logits: torch.Tensor, labels: torch.Tensor, ood_logits: dict[str, torch.Tensor],
                            groups: dict[str, str], levels=None, seed: int = 0) -> pd.DataFrame:
    """One row per noise level: level, acc, ece, nll, and ``auroc_<group>`` per OOD group."""
    levels = noise_levels() if levels is None else np.asarray(levels, dtype=np.float64)
    rows = []
    for index, level in enumerate(levels):
        noisy_id = noisy_logits(id_logits, float(level), seed, index, "id:test")
        row = {"level": float(level), **id_metrics(noisy_id, labels)}
        per_set = {name: msp_auroc(noisy_id, noisy_logits(logits, float(level), seed, index, name))
                   for name, logits in ood_logits.items()}
        for group in dict.fromkeys(groups.values()):
            row[f"auroc_{group}"] = float(np.mean([v for n, v in per_set.items() if groups[n] == group]))
        rows.append(row)
    return pd.DataFrame(rows)


def experiment_calibration(experiment: CachedExperiment, levels=None, seed: int = 0) -> pd.DataFrame:
    """`calibration_under_noise` for every model of the experiment, from the output cache."""
    frames = []
    for spec in experiment.config.models:
        test = experiment.outputs(spec, "id:test")
        groups = experiment.ood_tests(spec)
        ood = {split: experiment.outputs(spec, split).logits for split in groups}
        frame = calibration_under_noise(test.logits, test.labels, ood, groups, levels, seed)
        frames.append(frame.assign(model=spec.display))
    frame = pd.concat(frames, ignore_index=True)
    return frame[["model"] + [c for c in frame.columns if c != "model"]]


