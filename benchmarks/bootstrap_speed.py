"""Bootstrap intervals for a 20-method table: the time of `bootstrap_replicates`.

20 methods, each with 10,000 ID and 10,000 OOD scores (one OOD set; ID N(mu, 1) with mu
from 0.5 to 2, OOD N(0, 1)), 1,000 paired resamples, AUROC and the classic FPR@95 (then
the OpenOOD one). One warm-up call, then the median wall and CPU time of `--rounds` calls. Goal: < 5 s.

    .venv/bin/python benchmarks/bootstrap_speed.py [--methods 20] [--scores 10000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from oodbench.metrics.bootstrap import bootstrap_replicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=int, default=20)
    parser.add_argument("--scores", type=int, default=10_000, help="ID and OOD scores per method (each)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shifts = np.linspace(0.5, 2.0, args.methods)
    id_scores = {f"m{i}": rng.normal(mu, 1, args.scores) for i, mu in enumerate(shifts)}
    ood_scores = {key: {"ood": rng.normal(0, 1, args.scores)} for key in id_scores}
    for fpr in ("classic", "openood"):
        bootstrap_replicates(id_scores, ood_scores, resamples=10, fpr=fpr)
        wall, cpu = [], []
        for _ in range(args.rounds):
            start, start_cpu = time.perf_counter(), time.process_time()
            bootstrap_replicates(id_scores, ood_scores, resamples=args.resamples, fpr=fpr)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(f"{args.methods} methods x {args.scores:,} + {args.scores:,} scores, {args.resamples:,} resamples, "
              f"fpr {fpr}: median {statistics.median(wall):.2f} s wall, {statistics.median(cpu):.2f} s CPU "
              f"(on a busy machine the CPU time is what an idle one takes)")


if __name__ == "__main__":
    main()
