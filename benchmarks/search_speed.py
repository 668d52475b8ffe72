"""Hyperparameter search on cached outputs vs re-running the network for every combination.

On a real-size network (`real_size.py`: the CIFAR-10 ResNet-20 of ../shared on 1,000 ID
val JPEGs + 1,000 Tiny ImageNet OOD val images; without ../shared a random ResNet-18 on
synthetic images), the search lists of configs/postprocessors/ for GEN (gamma x M, 7 x 6),
KNN (its K list) and ReAct (its percentiles), fit on ID val; both ways in the same run:

- cached (oodbench): one-time extraction as a run does it for the splits the searches
  read (list and fingerprint them, load the model, one forward pass per split into a
  fresh output cache), then every combination fitted (through the fit-state cache) and
  scored on the cached outputs;
- re-run (OpenOOD's search): per method, a one-time forward pass over the fit split (its
  ``setup``), then the network re-run over ID val and OOD val for every combination
  (images read again, as OpenOOD's loaders do) before fitting and scoring.

Both ways must choose the same values. One warm-up round, then interleaved rounds; the
one-time and per-combination parts are printed separately, and the median over the
rounds of total re-run / total cached last (goal >= 50).

    .venv/bin/python benchmarks/search_speed.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from oodbench.storage.caches import FitStateCache
from oodbench.benchmark.extraction import extract
from oodbench.benchmark.config import ExperimentConfig, load_config
from oodbench.benchmark.fitting import fit_cached
from oodbench.benchmark.jobs import ExtractJob, RunContext, get_model, load_cached_outputs
from oodbench.benchmark.plan import benchmark_splits, search_space_for, split_state
from oodbench.benchmark.search import search_hyperparameters, validation_auroc
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.identity import output_key_text
from oodbench.file_state import FileState
from oodbench.models.adapter import ModelContext, ModelSpec
from oodbench.postprocessors.base import InvalidHyperparameter, grid
from oodbench.registry import POSTPROCESSORS

from real_size import BATCH_SIZE, benchmark_arguments  # beside this script

METHODS = ("gen", "knn", "react")


def cached_way(config: ExperimentConfig, spec: ModelSpec, benchmark, spaces: dict) -> tuple[float, float, dict]:
    """(one-time extraction s, search s, chosen values) as a run does them, into a fresh cache:
    list and fingerprint the splits the searches read (`split_state`, as the plan does), load
    the model, one `ExtractJob` per split; then each search on the cached outputs."""
    start = time.perf_counter()
    splits, token = benchmark_splits(benchmark, config.fit_split), uuid.uuid4().hex
    needed = ["id:val", *(s for s in splits if s.startswith("ood_val:"))]
    files = FileState(config.data_root, Path(config.cache_dir) / "state")
    states = {name: split_state(splits[name], config.data_root, benchmark.image, files, token) for name in needed}
    files.close()
    context = RunContext.of(config, spec, benchmark.image, "cpu", token)
    model = get_model(spec, context.model_context)
    keys = {name: output_key_text(model.identity, model.weights_hash, states[name].fingerprint) for name in needed}
    for name in needed:
        ExtractJob(context, splits[name], keys[name]).run()
    keys["id:fit"] = keys["id:val"]  # fit_split: val
    extracted = time.perf_counter()
    load = lambda name: load_cached_outputs(context, splits[name], keys[name])  # noqa: E731
    fit_cache = FitStateCache(context.model_context.cache_dir)
    chosen = {}
    for name, space in spaces.items():
        fit_outputs, val = load("id:fit"), load("id:val")
        ood_val = [load(s) for s in needed if s.startswith("ood_val:")]
        fit = lambda method: fit_cached(method, fit_outputs, val, fit_cache,  # noqa: E731
                                        [keys["id:fit"], keys["id:val"]])
        chosen[name] = search_hyperparameters(POSTPROCESSORS.get(name), {}, space, val, ood_val, fit)[0]
    return extracted - start, time.perf_counter() - extracted, chosen


def rerun_way(model, datasets: dict, spaces: dict) -> tuple[float, float, dict]:
    """(one-time fit-split passes s, per-combination passes and scoring s, chosen values)."""
    once, per_combination, chosen = 0.0, 0.0, {}
    forward = lambda name: extract(model, datasets[name], BATCH_SIZE, desc=name)  # noqa: E731
    for name, space in spaces.items():
        cls = POSTPROCESSORS.get(name)
        start = time.perf_counter()
        fit_outputs = forward("id:fit") if cls.needs_fit else None
        once += time.perf_counter() - start
        start = time.perf_counter()
        best = -np.inf
        for combo in grid(space):
            val = forward("id:val")
            ood_val = [forward(s) for s in datasets if s.startswith("ood_val:")]
            method = cls(**combo)
            try:
                fit_cached(method, fit_outputs, val, None, [])
                value = validation_auroc(method, val, ood_val)
            except InvalidHyperparameter:
                continue
            if value > best:
                best, chosen[name] = value, dict(combo)
        per_combination += time.perf_counter() - start
    return once, per_combination, chosen


def main() -> None:
    args, work, setup = benchmark_arguments(__doc__.split("\n\n")[0], "oodbench-search-speed-")
    benchmark = load_benchmark(str(setup.benchmark))
    splits = benchmark_splits(benchmark, "val")
    needed = ["id:fit", "id:val", *(s for s in splits if s.startswith("ood_val:"))]
    spec = ModelSpec(setup.model["name"], checkpoint=setup.model.get("checkpoint"), options=setup.model.get("options", {}))
    datasets = {name: load_dataset(splits[name].ref, setup.data_root, benchmark.image, ood=splits[name].ood)
                for name in needed}
    spaces = {name: search_space_for(name, POSTPROCESSORS.get(name)) for name in METHODS}
    model = get_model(spec, ModelContext(work / "model-cache", setup.data_root))

    parts = ("cached extraction", "cached search", "re-run one-time", "re-run per combination")
    seconds: dict[str, list[float]] = {part: [] for part in parts}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        config = load_config({"benchmark": str(setup.benchmark), "data_root": str(setup.data_root),
                              "models": [setup.model], "postprocessors": list(METHODS), "fit_split": "val",
                              "batch_size": BATCH_SIZE, "cache_dir": str(work / f"cache{round_}")})
        *cached, cached_choice = cached_way(config, spec, benchmark, spaces)
        *rerun, rerun_choice = rerun_way(model, datasets, spaces)
        shutil.rmtree(config.cache_dir)
        assert cached_choice == rerun_choice, (cached_choice, rerun_choice)
        if round_:
            for part, value in zip(parts, [*cached, *rerun]):
                seconds[part].append(value)
    median = {part: statistics.median(values) for part, values in seconds.items()}
    cached_totals = [e + s for e, s in zip(seconds["cached extraction"], seconds["cached search"])]
    rerun_totals = [o + c for o, c in zip(seconds["re-run one-time"], seconds["re-run per combination"])]
    ratio = statistics.median(r / c for r, c in zip(rerun_totals, cached_totals))
    search_ratio = statistics.median(r / c for r, c in zip(seconds["re-run per combination"], seconds["cached search"]))
    combos = {name: len(list(grid(space))) for name, space in spaces.items()}
    images = {name: len(datasets[name]) for name in needed if name != "id:fit"}
    print(f"{setup.what}; fit on ID val; {', '.join(f'{n} {c:,}' for n, c in images.items())} images; "
          f"combinations {', '.join(f'{n} {c}' for n, c in combos.items())} ({sum(combos.values())}); "
          f"threads {torch.get_num_threads()}, batch {BATCH_SIZE}; medians of {args.rounds} interleaved rounds after "
          f"a warm-up; load average {os.getloadavg()[0]:.1f}")
    for part in parts:
        print(f"{part:24s} {median[part]:9.2f} s   rounds {', '.join(f'{s:.2f}' for s in seconds[part])}")
    print(f"chosen (both ways): {cached_choice}")
    print(f"search alone (per-combination passes / search on cached outputs): {search_ratio:.0f}x")
    print(f"total re-run / total cached, one-time work counted on both sides: {ratio:.1f}x (goal >= 50)")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
