"""Hyperparameter search on cached outputs vs re-running the model for every combination.

On the built-in `digits` benchmark (model `digits-cnn`), for gen, knn, react, ash, scale
and vim with their search lists from configs/postprocessors/, both ways measured in the
same run:

- cached (oodbench): the fit, ID-val and OOD-val outputs are read from the output cache
  (filled once beforehand, one forward pass per split; that cost is printed too) and every
  combination is fitted and scored on them;
- re-run (the OpenOOD way): the model runs once over the fit split, then again over the
  ID-val and OOD-val sets for every combination before scoring them.

The datasets of the re-run way are decoded once and kept in memory, so its timing counts
forward passes only (OpenOOD also re-reads the images). No fit-state cache is used on
either side. Both ways must choose the same values.

    .venv/bin/python benchmarks/search_speed.py [--cache-dir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from oodbench.benchmark.cache import extract
from oodbench.benchmark.jobs import RunContext, fit_cached, get_model, load_cached_outputs, split_outputs
from oodbench.benchmark.plan import benchmark_splits, search_space_for
from oodbench.benchmark.search import search_hyperparameters, validation_auroc
from oodbench.benchmark.spec import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.models.adapter import ModelContext, ModelSpec
from oodbench.postprocessors.base import InvalidHyperparameter, grid
from oodbench.registry import POSTPROCESSORS

METHODS = ("gen", "knn", "react", "ash", "scale", "vim")


def search_on_cache(cls, space, load, ood_names):
    fit_outputs = load("id:fit") if cls.needs_fit else None
    val = load("id:val")
    ood_val = [load(name) for name in ood_names]
    fit = lambda method: fit_cached(method, fit_outputs, val, None, [])  # noqa: E731
    return search_hyperparameters(cls, {}, space, val, ood_val, fit)[0]


def search_rerunning_the_model(cls, space, forward, ood_names):
    fit_outputs = forward("id:fit") if cls.needs_fit else None
    best, chosen = -np.inf, None
    for combo in grid(space):
        val = forward("id:val")
        ood_val = [forward(name) for name in ood_names]
        method = cls(**combo)
        try:
            fit_cached(method, fit_outputs, val, None, [])
            value = validation_auroc(method, val, ood_val)
        except InvalidHyperparameter:
            continue
        if value > best:
            best, chosen = value, dict(combo)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="output cache (default: a fresh temporary folder)")
    parser.add_argument("--repeats", type=int, default=1, help="time each way this many times; report the best")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="oodbench-search-speed-"))
    benchmark = load_benchmark("digits")
    splits = benchmark_splits(benchmark, "train")
    context = RunContext(ModelSpec("digits-cnn"), ModelContext(cache_dir, cache_dir), benchmark.image,
                         str(cache_dir), batch_size=256, num_workers=0)
    model = get_model(context.model, context.model_context)
    ood_names = [name for name in splits if name.startswith("ood_val:")]
    needed = ["id:fit", "id:val", *ood_names]

    start = time.perf_counter()
    keys = {name: split_outputs(context, splits[name])[1] for name in needed}
    print(f"filling the output cache (once, {len(needed)} splits): {time.perf_counter() - start:.2f} s")
    datasets = {name: load_dataset(splits[name].ref, context.data_root, context.image, ood=splits[name].ood)
                for name in needed}
    load = lambda name: load_cached_outputs(context, splits[name], keys[name])  # noqa: E731
    forward = lambda name: extract(model, datasets[name], context.batch_size)  # noqa: E731

    def best_time(fn, *fn_args):
        times, result = [], None
        for _ in range(args.repeats):
            begin = time.perf_counter()
            result = fn(*fn_args)
            times.append(time.perf_counter() - begin)
        return min(times), result

    rows, total_cached, total_rerun = [], 0.0, 0.0
    for name in METHODS:
        cls = POSTPROCESSORS.get(name)
        space = search_space_for(name, cls)
        combos = len(list(grid(space)))
        cached_s, cached_choice = best_time(search_on_cache, cls, space, load, ood_names)
        rerun_s, rerun_choice = best_time(search_rerunning_the_model, cls, space, forward, ood_names)
        assert cached_choice == rerun_choice, (name, cached_choice, rerun_choice)
        total_cached, total_rerun = total_cached + cached_s, total_rerun + rerun_s
        chosen = ", ".join(f"{k}={v}" for k, v in cached_choice.items())
        rows.append(f"{name:<6} {combos:>6} {cached_s:>10.3f} {rerun_s:>10.3f} {rerun_s / cached_s:>7.1f}x  {chosen}")
    print(f"{'method':<6} {'combos':>6} {'cached s':>10} {'re-run s':>10} {'ratio':>8}  chosen")
    print("\n".join(rows))
    print(f"{'total':<6} {'':>6} {total_cached:>10.3f} {total_rerun:>10.3f} {total_rerun / total_cached:>7.1f}x")
    print(f"search on cached outputs is {total_rerun / total_cached:.1f}x faster than re-running the model "
          f"for every combination (digits-cnn, {len(ood_names)} OOD val sets, same run)")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
