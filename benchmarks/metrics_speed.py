"""One-pass OOD metrics against the scikit-learn calls they replace.

On 1,000,000 scores (half ID, N(1, 1); half OOD, N(0, 1); all distinct, the most
thresholds, unless ``--decimals`` rounds them into ties), both ways measured in the same
run:

- one pass (oodbench): ``ood_metrics``, one sort and cumulative counts for AUROC,
  both FPR@95 conventions and AUPR-In/Out;
- scikit-learn: what ``ood_metrics`` did before, ``roc_auc_score``, ``roc_curve`` (the
  OpenOOD FPR@95), ``average_precision_score`` twice and the classic FPR@95 from a sort
  of the ID scores; each sorts the same scores again.

One warm-up call each, then interleaved rounds (so drifting load hits both alike);
prints the median times, checks the two agree to 1e-12, and prints the ratio last.
Goals: one pass <= 0.5 s and <= 0.4x the scikit-learn time.

    .venv/bin/python benchmarks/metrics_speed.py [--scores 1000000] [--rounds 7] [--decimals 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodbench.metrics.detection import ood_metrics, threshold_keeping


def sklearn_metrics(id_score: np.ndarray, ood_score: np.ndarray) -> dict[str, float]:
    """The metrics as the landed ``ood_metrics`` computed them, one library call each."""
    score = np.concatenate([id_score, ood_score])
    is_ood = np.concatenate([np.zeros(id_score.size, bool), np.ones(ood_score.size, bool)])
    fpr, tpr, _ = roc_curve(is_ood, -score)
    return {
        "fpr95": float(np.mean(ood_score >= threshold_keeping(id_score, 0.95))),
        "fpr95_openood": float(fpr[np.argmax(tpr >= 0.95)]),
        "auroc": float(roc_auc_score(~is_ood, score)),
        "aupr_in": float(average_precision_score(~is_ood, score)),
        "aupr_out": float(average_precision_score(is_ood, -score)),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", type=int, default=1_000_000, help="total scores, half of them ID")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decimals", type=int, default=None, help="round the scores (ties)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    half = args.scores // 2
    id_score, ood_score = rng.normal(1.0, 1.0, half), rng.normal(0.0, 1.0, args.scores - half)
    if args.decimals is not None:
        id_score, ood_score = np.round(id_score, args.decimals), np.round(ood_score, args.decimals)

    one_pass = lambda: ood_metrics(id_score, ood_score)  # noqa: E731
    library = lambda: sklearn_metrics(id_score, ood_score)  # noqa: E731
    ours, theirs = one_pass(), library()  # warm-up
    worst = max(abs(ours[name] - theirs[name]) for name in theirs)
    one_pass_s, library_s = [], []
    for _ in range(args.rounds):
        one_pass_s.append(timed(one_pass))
        library_s.append(timed(library))

    ours_s, theirs_s = statistics.median(one_pass_s), statistics.median(library_s)
    print(f"{args.scores:,} scores ({half:,} ID), {len(np.unique(np.r_[id_score, ood_score])):,} distinct; "
          f"{args.rounds} interleaved rounds after one warm-up; medians:")
    print(f"one pass (ood_metrics): {ours_s:.3f} s (goal <= 0.5 s)")
    print(f"scikit-learn calls:     {theirs_s:.3f} s")
    print(f"largest difference: {worst:.1e} (must be <= 1e-12)")
    print(f"ratio one pass / scikit-learn: {ours_s / theirs_s:.3f} (goal <= 0.4)")


if __name__ == "__main__":
    main()
