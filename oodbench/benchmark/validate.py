"""`oodbench validate`: everything about an experiment config that can fail before any data is
read — plugins, postprocessor names and hyperparameters (fixed and searched), model sources
and options, checkpoint files — checked in the order `run` would meet them."""

from __future__ import annotations

import sys
from pathlib import Path

from oodbench.benchmark.config import DATA_ROOT_OPTIONS, ExperimentConfig
from oodbench.benchmark.plan import benchmark_splits
from oodbench.benchmark.runner import check_config
from oodbench.datasets.benchmarks import Benchmark, load_benchmark
from oodbench.errors import OodbenchError
from oodbench.models.adapter import check_model, missing_checkpoint
from oodbench.registry import DATASETS


def validate_config(config: ExperimentConfig) -> str:
    """A one-line summary of a valid `config` (benchmark, models, postprocessors, OOD sets).
    Raises OodbenchError with the first problem; every missing checkpoint but the last is
    printed on stderr first, so one run of `validate` names them all. A data root that does
    not exist is an error when the ID test split reads files from it (`run` would stop
    there; said on its own line before missing checkpoints, which it may explain), else a
    note on stderr naming the splits `run` would find missing."""
    names = check_config(config)
    for spec in config.models:  # what `run` would refuse when it loads the model
        check_model(spec)
    benchmark = load_benchmark(config.benchmark)
    problem = missing_data_root(config, benchmark)
    missing = [line for spec in config.models if (line := missing_checkpoint(spec, Path(config.data_root)))]
    if problem is not None:
        line, fatal = problem
        if fatal and not missing:
            raise OodbenchError(line)
        print(line if fatal else f"note: {line}", file=sys.stderr)  # before the checkpoints it explains
    if missing:
        for line in missing[:-1]:
            print(line, file=sys.stderr)
        raise OodbenchError(missing[-1] + (f" ({len(missing)} checkpoints missing, listed above)"
                                           if len(missing) > 1 else ""))
    return (f"ok: {benchmark.name} v{benchmark.version}, {len(config.models)} model(s), "
            f"{len(names)} postprocessor(s), {len(benchmark.near)} near + {len(benchmark.far)} far OOD sets")


def missing_data_root(config: ExperimentConfig, benchmark: Benchmark) -> tuple[str, bool] | None:
    """When the data root does not exist and splits of the benchmark read files from it (the
    built-in offline sets of `oodbench.datasets.builtin` read none): the line naming them,
    and whether the ID test split is one of them. None otherwise."""
    root = Path(config.data_root).expanduser()
    if root.exists():
        return None
    reading = [name for name, split in benchmark_splits(benchmark, config.fit_split).items()
               if DATASETS.get(split.ref.dataset).__module__ != "oodbench.datasets.builtin"]
    if not reading:
        return None
    return (f"data root {root} does not exist ({DATA_ROOT_OPTIONS}); the splits {', '.join(reading)} read their "
            "files from it", "id:test" in reading)
