"""A whole leaderboard run against its floor, and against re-running the network per method.

On a real-size network: the CIFAR-10 ResNet-20 of ../shared on real images (ID: the
CIFAR-10 test JPEGs, 1,000 val + 2,000 test; OOD val: 1,000 Tiny ImageNet val images; OOD
test: 1,000 each of other Tiny ImageNet val images, MNIST and LSUN resize). Without
../shared: a randomly initialised torchvision ResNet-18 (10 classes) on synthetic 32x32
PNG images in the same split sizes (say so when quoting). Every output-based built-in
postprocessor (those that read cached outputs alone: 27 today) with its search lists,
fit on ID val. Three ways, each over exactly the same images, in the same process:

- bare: decode every image of every split and run the network forward over it once, in
  batches, nothing else: the floor of any harness;
- oodbench: ``run_experiment`` from the config to the table, with a fresh output cache and
  results store (listing, fingerprints, one extraction per split, fits, searches,
  metrics, store);
- per-method inference (OpenOOD's evaluator): for each postprocessor, the network re-run
  over every split it reads (fit, search, test), then the same fit, search and metrics.

Goals: oodbench / bare <= 1.3, per-method / oodbench >= 10. One warm-up round (imports,
first-call costs), then interleaved rounds; the medians and their ratios are printed,
the ratios last.

    .venv/bin/python benchmarks/leaderboard_overhead.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader

from oodbench.benchmark.extraction import extract
from oodbench.benchmark.jobs import fit_cached
from oodbench.benchmark.plan import benchmark_splits, search_space_for
from oodbench.benchmark.runner import run_experiment
from oodbench.benchmark.search import search_hyperparameters
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.metrics.detection import ood_metrics
from oodbench.models.adapter import ModelContext, ModelSpec, load_model
from oodbench.registry import POSTPROCESSORS

from real_size import BATCH_SIZE, benchmark_arguments  # beside this script


def output_based() -> list[str]:
    """Built-in methods that read the cached outputs alone (not the model, intermediate
    layers, extra inputs or several checkpoints)."""
    return [entry.name for entry in POSTPROCESSORS.entries()
            if not (entry.obj.needs_model or entry.obj.needs_extras or entry.obj.needs_layers
                    or entry.obj.needs_checkpoints)]


def bare(model, datasets: dict) -> None:
    """Decode and forward every image once: the floor."""
    with torch.no_grad():
        for dataset in datasets.values():
            for images, _ in DataLoader(dataset, batch_size=BATCH_SIZE):
                model(images)


def per_method_inference(model, datasets: dict, methods: list[str], groups: dict) -> None:
    """OpenOOD's evaluator: the network re-run over every split a method reads, per method."""
    for name in methods:
        cls = POSTPROCESSORS.get(name)
        space = search_space_for(name, cls)
        reads = [s for s in datasets if s == "id:test" or s in groups or (s == "id:val" and (cls.needs_fit or space))
                 or (s.startswith("ood_val:") and space)]
        outputs = {split: extract(model, datasets[split], BATCH_SIZE, desc=split) for split in reads}
        fit = lambda method: fit_cached(method, outputs.get("id:val"), outputs.get("id:val"), None, [])  # noqa: E731
        ood_val = [o for split, o in outputs.items() if split.startswith("ood_val:")]
        chosen = search_hyperparameters(cls, {}, space, outputs["id:val"], ood_val, fit)[0] if space else {}
        method = cls(**chosen)
        fit(method)
        id_scores = method.score(outputs["id:test"]).double().numpy()
        for split in groups:
            ood_metrics(id_scores, method.score(outputs[split]).double().numpy())


def main() -> None:
    args, work, setup = benchmark_arguments(__doc__.split("\n\n")[0], "oodbench-overhead-")
    methods = output_based()

    benchmark = load_benchmark(str(setup.benchmark))
    splits = benchmark_splits(benchmark, "val")
    datasets = {name: load_dataset(split.ref, setup.data_root, benchmark.image, ood=split.ood)
                for name, split in splits.items() if name != "id:fit"}
    images = sum(len(d) for d in datasets.values())
    model = load_model(ModelSpec(setup.model["name"], checkpoint=setup.model.get("checkpoint"),
                                 options=setup.model.get("options", {})),
                       ModelContext(cache_dir=work / "model-cache", data_root=setup.data_root))
    groups = [name for name in datasets if name.split(":")[0] in ("near", "far")]

    def oodbench_run(round_: int) -> None:
        where = work / f"run{round_}"
        config = {"benchmark": str(setup.benchmark), "data_root": str(setup.data_root), "models": [setup.model],
                  "postprocessors": methods, "search": True, "fit_split": "val", "batch_size": BATCH_SIZE,
                  "cache_dir": str(where / "cache"), "results": str(where / "results.sqlite")}
        run_experiment(config, quiet=True)
        shutil.rmtree(where)

    ways = {"bare": lambda r: bare(model, datasets), "oodbench": oodbench_run,
            "per-method": lambda r: per_method_inference(model, datasets, methods, groups)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for way, fn in ways.items():
            start = time.perf_counter()
            fn(round_)
            if round_:
                seconds[way].append(time.perf_counter() - start)
    median = {way: statistics.median(values) for way, values in seconds.items()}
    overhead = statistics.median(o / b for o, b in zip(seconds["oodbench"], seconds["bare"]))
    saving = statistics.median(p / o for p, o in zip(seconds["per-method"], seconds["oodbench"]))
    print(f"{setup.what}; {images:,} images ({', '.join(f'{n} {len(d):,}' for n, d in datasets.items())}); "
          f"{len(methods)} output-based postprocessors with search, fit on ID val: {', '.join(methods)}; "
          f"threads {torch.get_num_threads()}, batch {BATCH_SIZE}; medians of {args.rounds} interleaved rounds "
          f"after a warm-up; load average {os.getloadavg()[0]:.1f}")
    for way in ways:
        print(f"{way:10s} {median[way]:8.2f} s   rounds {', '.join(f'{s:.2f}' for s in seconds[way])}")
    print(f"median of the rounds' ratios: oodbench / bare decode + forward {overhead:.2f} (goal <= 1.3); "
          f"per-method inference / oodbench {saving:.1f}x (goal >= 10)")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
