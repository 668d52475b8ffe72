"""The operating-point report: what a deployed detector does at one threshold.

The threshold keeps a share `keep` (95%) of the ID validation samples: the largest t
with at least ``ceil(keep * N)`` validation scores >= t (the same rule as classic
FPR@95), or a given tau. On the test splits a sample is *accepted* (called ID) when its
score >= t. The report gives the accuracy on the accepted ID samples, the share of each
OOD set rejected, and precision / recall / F1 of the two decisions, ID and OOD, like a
classification report.

**Held-out classes** (pseudo-novel ID classes, ``holdout_classes`` of a benchmark's test
split or of the Python API): the ID test samples of those classes should be called
novel. The *seen accuracy* is the share of the other ID test samples that are accepted
and given the right class; the *unseen accuracy* the share of the held-out samples that
are rejected (called novel).

**Several heads** (a model with named outputs, each a model entry with its ``output``):
`summary_frame` puts one row per head side by side: tau, accuracy on accepted ID, the
share of OOD rejected, and the seen / unseen accuracy.

Scores come from the cached outputs with the hyperparameters stored in the result cell
(and the same fit), so nothing is extracted again; methods that need input gradients
(``needs_model``) run the model over the split images again, and the report says so.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.metrics.detection import threshold_keeping
from oodbench.models.adapter import ModelSpec

KEEP = 0.95


# --------------------------------------------------------------------------- the evaluator


def decision_report(true_positive: int, predicted: int, actual: int) -> dict[str, float]:
    """Precision, recall and F1 of one decision from its counts (0 where undefined)."""
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def operating_point(threshold: float, id_scores, id_correct, ood_scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts and rates at `threshold` (accept = score >= threshold) on the test splits."""
    id_accepted = np.asarray(id_scores) >= threshold
    id_correct = np.asarray(id_correct, dtype=bool)
    sets = {}
    for name, scores in ood_scores.items():
        rejected = int(np.sum(np.asarray(scores) < threshold))
        sets[name] = {"samples": len(scores), "rejected": rejected, "rejected_share": rejected / len(scores)}
    ood_total = sum(s["samples"] for s in sets.values())
    ood_rejected = sum(s["rejected"] for s in sets.values())
    accepted_id = int(id_accepted.sum())
    accepted_ood = ood_total - ood_rejected
    return {
        "threshold": threshold,
        "id": {"samples": id_accepted.size, "accepted": accepted_id,
               "accuracy_all": float(id_correct.mean()),
               "accuracy_accepted": float(id_correct[id_accepted].mean()) if accepted_id else float("nan")},
        "ood": sets,
        "decisions": {
            "ID": decision_report(accepted_id, accepted_id + accepted_ood, id_accepted.size),
            "OOD": decision_report(ood_rejected, ood_rejected + id_accepted.size - accepted_id, ood_total),
        },
    }


def holdout_report(threshold: float, id_scores, predictions, labels, holdout: Sequence[int]) -> dict[str, Any]:
    """Seen / unseen accuracy at `threshold` when the ID classes `holdout` are pseudo-novel:
    seen = share of the other samples accepted (score >= threshold) with the right class,
    unseen = share of the held-out samples rejected."""
    labels = np.asarray(labels)
    accepted = np.asarray(id_scores) >= threshold
    unseen = np.isin(labels, list(holdout))
    right = accepted & (np.asarray(predictions) == labels)

    def share(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return {"classes": [int(c) for c in holdout],
            "seen": {"samples": int((~unseen).sum()), "accuracy": share(right[~unseen])},
            "unseen": {"samples": int(unseen.sum()), "accuracy": share(~accepted[unseen])}}


def model_operating_point(experiment: CachedExperiment, spec: ModelSpec, name: str, tau: float | None = None,
                          keep: float = KEEP, holdout: Sequence[int] | None = None) -> dict[str, Any]:
    """The report of one model (or head) and postprocessor; `holdout`: the held-out ID classes
    (default: the benchmark test split's ``holdout_classes``)."""
    method = experiment.fitted(spec, name)
    groups = experiment.ood_tests(spec)
    threshold = tau if tau is not None else threshold_keeping(experiment.scores(method, spec, "id:val"), keep)
    test = experiment.outputs(spec, "id:test")
    correct = test.predictions.numpy() == test.labels.numpy()
    id_scores = experiment.scores(method, spec, "id:test")
    report = operating_point(threshold, id_scores, correct, {s: experiment.scores(method, spec, s) for s in groups})
    report.update(model=spec.display, postprocessor=name, params=dict(method.params),
                  rule=f"tau = {tau:g} (given)" if tau is not None else f"keeps {keep:.0%} of ID validation",
                  groups=groups)
    holdout = experiment.benchmark.holdout_classes if holdout is None else holdout
    if holdout:
        report["holdout"] = holdout_report(threshold, id_scores, test.predictions.numpy(), test.labels.numpy(),
                                           holdout)
    return report


def summary_frame(reports: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per report (per model or head): tau, ID accepted share, accuracy on accepted ID,
    share of all OOD rejected, and seen / unseen accuracy when classes were held out."""
    rows = []
    for report in reports:
        ood = report["ood"].values()
        row = {"model": report["model"], "postprocessor": report["postprocessor"], "tau": report["threshold"],
               "id_accepted": report["id"]["accepted"] / report["id"]["samples"],
               "accuracy_accepted": report["id"]["accuracy_accepted"],
               "ood_rejected": sum(v["rejected"] for v in ood) / sum(v["samples"] for v in ood)}
        if "holdout" in report:
            row.update(seen_accuracy=report["holdout"]["seen"]["accuracy"],
                       unseen_accuracy=report["holdout"]["unseen"]["accuracy"])
        rows.append(row)
    return pd.DataFrame(rows)


def render_summary(frame: pd.DataFrame) -> str:
    """`summary_frame` as a markdown table, rates x100."""
    from tabulate import tabulate

    names = {"model": "model / head", "postprocessor": "postprocessor", "tau": "tau", "id_accepted": "ID accepted %",
             "accuracy_accepted": "acc. on accepted ID", "ood_rejected": "OOD rejected %",
             "seen_accuracy": "seen acc.", "unseen_accuracy": "unseen acc. (rejected)"}
    rows = [[row[c] if c in ("model", "postprocessor") else (f"{row[c]:.6g}" if c == "tau" else 100 * row[c])
             for c in frame.columns] for _, row in frame.iterrows()]
    return tabulate(rows, headers=[names[c] for c in frame.columns], tablefmt="pipe", floatfmt=".2f",
                    disable_numparse=[list(frame.columns).index("tau")])


def render_operating_point(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    params = ", ".join(f"{k}={v}" for k, v in report["params"].items()) or "defaults"
    ident = report["id"]
    lines = [
        f"{report['model']} / {report['postprocessor']} ({params}): threshold {report['threshold']:.6g}, "
        f"{report['rule']}; accept = score >= threshold",
        f"ID test: {ident['accepted']} of {ident['samples']} accepted ({ident['accepted'] / ident['samples']:.2%}); "
        f"accuracy {100 * ident['accuracy_all']:.2f} on all, {100 * ident['accuracy_accepted']:.2f} on accepted",
    ]
    if "holdout" in report:
        held = report["holdout"]
        lines.append(f"held-out classes {held['classes']} as pseudo-novel: seen accuracy "
                     f"{100 * held['seen']['accuracy']:.2f} ({held['seen']['samples']} samples, accepted with the "
                     f"right class), unseen accuracy {100 * held['unseen']['accuracy']:.2f} "
                     f"({held['unseen']['samples']} samples, rejected as novel)")
    lines += [
        "",
        tabulate([[s.split(':', 1)[1], report["groups"][s], v["samples"], v["rejected"], 100 * v["rejected_share"]]
                  for s, v in report["ood"].items()],
                 headers=["OOD set", "group", "samples", "rejected", "rejected %"], tablefmt="pipe", floatfmt=".2f"),
        "",
        tabulate([[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in report["decisions"].items()],
                 headers=["decision", "precision", "recall", "f1", "support"], tablefmt="pipe", floatfmt=".4f"),
    ]
    return "\n".join(lines)
