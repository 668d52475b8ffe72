"""Failure detection (misclassification detection, selective classification): does a
score tell the classifier's right ID predictions from its wrong ones?

The inputs are one score per ID test sample (higher = more confident, as every
postprocessor's score) and whether the sample's prediction is right. A selective
classifier accepts the samples scored at or above a threshold t; at each distinct score
value (ties form one threshold, as in scikit-learn's curves) it has

- coverage c(t) = accepted / N,
- selective risk r(t) = wrong accepted / accepted (the error rate on what it keeps),
- generalized risk g(t) = wrong accepted / N (the joint probability of being accepted
  and wrong; Traub et al., "Overcoming Common Flaws in the Evaluation of Selective
  Classification Systems", NeurIPS 2024).

Areas follow the reference implementation of Traub et al. (FD-Shifts,
``fd_shifts/analysis/rc_stats.py``): the trapezoid rule over the curve's points, the
selective risk carried flat from the lowest coverage to c = 0 and the generalized risk
going to 0 there.

- **AURC** (Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep Neural
  Classifiers", ICLR 2019): the area under the risk–coverage curve (c, r);
- **E-AURC**: AURC minus the AURC of a perfect ranking at the same accuracy, in the
  continuous form of Geifman et al., e + (1 - e) ln(1 - e), e the error rate;
- **AUGRC** (Traub et al. 2024): the area under (c, g); it equals
  (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2, where AUROC_f is the AUROC below;
- **AUROC_f**: the AUROC of separating right (positive) from wrong predictions by the score;
- **FPR@95_f**: the share of wrong predictions accepted at the threshold that keeps 95%
  of the right ones (the classic ID-positive FPR@95 with right = ID, wrong = OOD).

Lower is better for AURC, E-AURC, AUGRC and FPR@95_f; higher for AUROC_f. All are in
[0, 1] (E-AURC can be slightly negative where tied scores hide the order). A sample set
with no wrong (or no right) prediction has no failure AUROC / FPR: they are NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from oodbench.metrics.detection import ScoreCounts

FAILURE_METRICS = ("aurc", "eaurc", "augrc", "auroc", "fpr95")
FAILURE_FRAME_METRICS = ("acc", *FAILURE_METRICS)  # the columns of `experiment_failure`'s frame after model, method
LOWER_IS_BETTER = {"aurc": True, "eaurc": True, "augrc": True, "auroc": False, "fpr95": True}


def _arrays(score, correct) -> tuple[np.ndarray, np.ndarray]:
    score = np.asarray(score, dtype=np.float64).ravel()
    correct = np.asarray(correct).astype(bool).ravel()
    if score.shape != correct.shape:
        raise ValueError(f"{score.size} scores for {correct.size} correctness flags")
    if not score.size:
        raise ValueError("failure metrics need at least one sample")
    if not np.isfinite(score).all():
        raise ValueError(f"{int((~np.isfinite(score)).sum())} of {score.size} scores are NaN or infinite")
    return score, correct


@dataclass(frozen=True)
class RiskCoverage:
    """The curve's points from full coverage down, one per distinct score (float64 arrays).

    ``coverage[k]``, ``selective_risk[k]``, ``generalized_risk[k]`` at the k-th highest
    threshold counted from the lowest score (k = 0: everything accepted, coverage 1);
    ``threshold[k]`` the score value accepted from."""

    coverage: np.ndarray
    selective_risk: np.ndarray
    generalized_risk: np.ndarray
    threshold: np.ndarray

    @classmethod
    def of(cls, score, correct) -> "RiskCoverage":
        score, correct = _arrays(score, correct)
        order = np.argsort(-score, kind="stable")
        ranked = score[order]
        last_of_value = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
        wrong = np.cumsum(~correct[order], dtype=np.int64)[last_of_value]
        accepted = last_of_value + 1
        return cls(coverage=(accepted / score.size)[::-1], selective_risk=(wrong / accepted)[::-1],
                   generalized_risk=(wrong / score.size)[::-1], threshold=ranked[last_of_value][::-1])

    def aurc(self) -> float:
        """Trapezoid area under (coverage, selective risk), flat from the lowest coverage to 0."""
        coverage = np.append(self.coverage, 0.0)
        risk = np.append(self.selective_risk, self.selective_risk[-1])
        return _trapezoid(coverage, risk)

    def augrc(self) -> float:
        """Trapezoid area under (coverage, generalized risk), from (0, 0)."""
        return _trapezoid(np.append(self.coverage, 0.0), np.append(self.generalized_risk, 0.0))


def _trapezoid(coverage: np.ndarray, risk: np.ndarray) -> float:
    """Area under `risk` over `coverage` given from 1 down to 0."""
    return float(np.dot(-np.diff(coverage), (risk[1:] + risk[:-1]) / 2))


def optimal_aurc(error_rate: float) -> float:
    """e + (1 - e) ln(1 - e): the AURC of a perfect ranking at error rate e (Geifman et al. 2019)."""
    return float(error_rate + (1 - error_rate) * np.log1p(-error_rate)) if error_rate < 1 else 1.0


def aurc(score, correct) -> float:
    """Area under the risk–coverage curve, in [0, 1], lower is better.

    `score`: N confidences (higher = more confident); `correct`: N flags, whether each
    prediction is right."""
    return RiskCoverage.of(score, correct).aurc()


def eaurc(score, correct) -> float:
    """Excess AURC: `aurc` minus `optimal_aurc` of the error rate (Geifman et al. 2019)."""
    score, correct = _arrays(score, correct)
    return aurc(score, correct) - optimal_aurc(1 - float(correct.mean()))


def augrc(score, correct) -> float:
    """Area under the generalized risk–coverage curve (Traub et al. 2024), in [0, 0.5]."""
    return RiskCoverage.of(score, correct).augrc()


def failure_auroc(score, correct) -> float:
    """AUROC of telling right (positive) from wrong predictions; NaN when either is absent."""
    score, correct = _arrays(score, correct)
    return ScoreCounts.of(score, ~correct).auroc() if 0 < correct.sum() < correct.size else float("nan")


def failure_fpr(score, correct, tpr: float = 0.95) -> float:
    """Share of wrong predictions accepted at the threshold keeping `tpr` of the right ones; NaN
    when either is absent."""
    score, correct = _arrays(score, correct)
    return ScoreCounts.of(score, ~correct).fpr_id_positive(tpr) if 0 < correct.sum() < correct.size else float("nan")


def failure_metrics(score, correct) -> dict[str, float]:
    """Every metric of `FAILURE_METRICS` (plus the accuracy ``acc``) from one score array."""
    score, correct = _arrays(score, correct)
    curve = RiskCoverage.of(score, correct)
    accuracy = float(correct.mean())
    return {"acc": accuracy, "aurc": curve.aurc(), "eaurc": curve.aurc() - optimal_aurc(1 - accuracy),
            "augrc": curve.augrc(), "auroc": failure_auroc(score, correct), "fpr95": failure_fpr(score, correct)}


# --------------------------------------------------------------------------- on a finished run


def experiment_failure(experiment, names: list[str] | None = None, models: list[str] | None = None
                       ) -> tuple[pd.DataFrame, dict[tuple[str, str], RiskCoverage]]:
    """`failure_metrics` of each (model, postprocessor) of a finished run on its ID test split,
    and each one's `RiskCoverage` curve.

    `experiment`: an `oodbench.benchmark.experiment.CachedExperiment`; `names` / `models`:
    only these postprocessors / model displays (default: all of the config). Scores are the
    per-image ID test scores the run stored with each cell (so methods that need input
    gradients are not run again); a store written before scores were stored has the method
    fitted and scored again from the output cache. Right or wrong is the cached prediction
    against the label. Cells the store lacks are left out with one warning naming them."""
    from oodbench.errors import OodbenchError

    names, specs = experiment.selected(names, models)
    rows, curves, absent = [], {}, []
    for spec in specs:
        test = experiment.outputs(spec, "id:test")
        correct = test.predictions.numpy() == test.labels.numpy()
        for name in names:
            try:
                scores = experiment.stored_scores(spec, name)
                if scores is None:
                    scores = experiment.scores(experiment.fitted(spec, name), spec, "id:test")
            except OodbenchError:
                absent.append(f"{spec.display} / {name}")
                continue
            rows.append({"model": spec.display, "postprocessor": name, **failure_metrics(scores, correct)})
            curves[spec.display, name] = RiskCoverage.of(scores, correct)
    if not rows:
        raise OodbenchError(f"no finished cells of {experiment.config.source} in {experiment.store.path}; "
                            f"{experiment.run_first}")
    if absent:
        warnings.warn(f"no stored result for {', '.join(absent)}; left out", stacklevel=2)
    return pd.DataFrame(rows), curves


