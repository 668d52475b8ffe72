"""Mean and standard deviation over the seeds of a benchmark (open-set recognition).

OpenOOD v1.5 reports each OSR benchmark (``osr_mnist6`` ...) as the mean over five
seeds, each seed a class split with its own checkpoint. oodbench keeps one benchmark
per seed (``osr_mnist6_seed1`` .. ``_seed5``). ``oodbench leaderboard --average-seeds``
(or ``--benchmark osr_mnist6``, the family name) folds them:

- `average_frames`: the leaderboard frames of a family's seeds into one frame whose rows
  are each (model, postprocessor, setting) once per seed, as checkpoints ``seed<N>``; the
  tables then show the mean ± sample standard deviation over the seeds, as over checkpoints;
- `average_over_seeds`: tidy rows (``--format csv|json``) into one row per family, model,
  postprocessor, dataset and metric, with the mean, the sample standard deviation and the
  seeds it averaged. A family average needs every seed's row: a missing seed leaves
  ``seeds`` short rather than silently averaging fewer.

    oodbench leaderboard --results r.sqlite --format json > rows.json
    python -m oodbench.report.seeds rows.json
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

import pandas as pd

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


def seed_families(benchmarks: Iterable[str]) -> dict[str, list[str]]:
    """family -> its ``<family>_seed<N>`` benchmarks among `benchmarks`, by seed."""
    families: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in benchmarks:
        match = SEEDED.match(name)
        if match:
            families[match["family"]].append((int(match["seed"]), name))
    return {family: [name for _, name in sorted(members)] for family, members in families.items()}


def mixed_fpr(frames: list[pd.DataFrame]) -> list[str]:
    """The seed families among the leaderboard `frames` whose seeds' tables show FPR@95 in
    different conventions (cells run under different ones): their mean would mix two metrics."""
    used: dict[str, set[str]] = defaultdict(set)
    for frame in frames:
        match = SEEDED.match(frame.attrs["benchmark"])
        if match:
            used[match["family"]].add(frame.attrs["fpr"])
    return sorted(family for family, conventions in used.items() if len(conventions) > 1)


def average_frames(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Leaderboard frames with those of each seed family folded into one frame named after
    the family (its rows are the seeds' cells, checkpoint ``seed<N>``; ``attrs["seeds"]``
    lists the seeds); the frames of other benchmarks are returned as they are."""
    by_name = {frame.attrs["benchmark"]: frame for frame in frames}
    families = seed_families(by_name)
    folded = {name: family for family, names in families.items() for name in names}
    out, done = [], set()
    for frame in frames:
        family = folded.get(frame.attrs["benchmark"])
        if family is None:
            out.append(frame)
        elif family not in done:
            done.add(family)
            out.append(_fold(family, [by_name[name] for name in families[family]]))
    return out


def _fold(family: str, frames: list[pd.DataFrame]) -> pd.DataFrame:
    seeds = [int(SEEDED.match(frame.attrs["benchmark"])["seed"]) for frame in frames]
    parts = [frame.assign(checkpoint=[f"seed{seed}" + (f"/{c}" if c else "") for c in frame.checkpoint])
             for seed, frame in zip(seeds, frames)]
    merged = pd.concat(parts, ignore_index=True)
    first = frames[0].attrs

    def union(key: str) -> list:
        return list(dict.fromkeys(item for frame in frames for item in frame.attrs.get(key, [])))

    merged.attrs.update({**first, "benchmark": family, "seeds": seeds, "datasets": union("datasets"),
                         "groups": {k: v for frame in frames for k, v in frame.attrs["groups"].items()},
                         "missing": union("missing"), "fallback": union("fallback"), "csid": union("csid"),
                         "csid_missing": union("csid_missing"),
                         "data_fingerprints": union("data_fingerprints"),
                         "hidden": sum(frame.attrs.get("hidden", 0) for frame in frames),
                         "sampling": "; ".join(f"seed {seed}: {frame.attrs['sampling']}"
                                               for seed, frame in zip(seeds, frames) if frame.attrs.get("sampling"))})
    return merged


def averaged_tidy(tidy: pd.DataFrame) -> pd.DataFrame:
    """The tidy rows of seed families averaged (`average_over_seeds`): ``value`` is the mean,
    ``std`` the sample standard deviation, ``seeds`` the seeds averaged (``1,2,3,4,5``)."""
    rows = average_over_seeds(tidy.to_dict("records"))
    return pd.DataFrame([{**{k: row[k] for k in ("benchmark", *KEY)}, "value": row["mean"], "std": row["std"],
                          "seeds": ",".join(map(str, row["seeds"]))} for row in rows],
                        columns=["benchmark", *KEY, "value", "std", "seeds"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return list(csv.DictReader(text.splitlines()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m oodbench.report.seeds ROWS.json|ROWS.csv", file=sys.stderr)
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
