"""Mean and standard deviation over the seeds of a benchmark (open-set recognition).

OpenOOD v1.5 reports each OSR benchmark (``osr_mnist6`` ...) as the mean over five
seeds, each seed a class split with its own checkpoint. oodbench keeps one benchmark
per seed (``osr_mnist6_seed1`` .. ``_seed5``); this module folds the tidy rows of
``oodbench leaderboard --format json`` (or ``csv``) of those runs into one row per
benchmark family, model, postprocessor, dataset and metric, with the mean, the sample
standard deviation and the seeds it averaged. A family average needs every seed's row:
a missing seed leaves ``seeds`` short rather than silently averaging fewer.

    oodbench leaderboard --results r.sqlite --format json > rows.json
    python -m oodbench.results.seeds rows.json
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

SEEDED = re.compile(r"^(?P<family>.+)_seed(?P<seed>\d+)$")
KEY = ("model", "postprocessor", "setting", "dataset", "group", "metric", "fpr_convention")


def average_over_seeds(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``<family>_seed<N>`` benchmarks -> one row per family and key, mean and std over seeds."""
    values: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        match = SEEDED.match(str(row["benchmark"]))
        if match is None:
            continue
        key = (match["family"], *(str(row.get(k, "")) for k in KEY))
        values[key][int(match["seed"])] = float(row["value"])
    averaged = []
    for key, by_seed in sorted(values.items()):
        seeds = sorted(by_seed)
        numbers = [by_seed[s] for s in seeds]
        averaged.append({"benchmark": key[0], **dict(zip(KEY, key[1:])), "seeds": seeds,
                         "mean": statistics.fmean(numbers),
                         "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0})
    return averaged


def read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return list(csv.DictReader(text.splitlines()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m oodbench.results.seeds ROWS.json|ROWS.csv", file=sys.stderr)
        return 2
    rows = average_over_seeds(read_rows(Path(argv[0])))
    print(f"{'benchmark':<14} {'model':<16} {'postprocessor':<14} {'dataset':<16} {'metric':<13} "
          f"{'mean x100':>10} {'std x100':>9}  seeds")
    for row in rows:
        metric = f"{row['metric']}:{row['fpr_convention']}" if row["fpr_convention"] else row["metric"]
        print(f"{row['benchmark']:<14} {row['model']:<16} {row['postprocessor']:<14} {row['dataset']:<16} "
              f"{metric:<13} {100 * row['mean']:>10.2f} {100 * row['std']:>9.2f}  "
              f"{','.join(map(str, row['seeds']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
