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

Goals: oodbench / bare <= 1.15, per-method / oodbench >= 10. Where the oodbench way's CPU
goes is printed too, from its median round: listing and fingerprinting the splits
(``Plan.resolve``), extraction jobs, scoring jobs (the costliest methods named), and the
rest (model load, store). ``--methods a,b,...`` times a subset, e.g. the 27 output-based
methods the first measurements used (README, "How the grid's cost grows"). One warm-up round (imports,
first-call costs), then interleaved rounds; the medians and their ratios are printed,
the ratios last. Each way is timed twice: wall-clock seconds, and CPU seconds (user +
system of this process and of any child it waited for, e.g. DataLoader workers). On a
shared machine other work stretches the wall time of whichever way it overlaps, while
the CPU time a way spends is about the same whatever else runs: the CPU ratio is the
figure to trust there, the wall ratio the one a user on an idle machine sees.

    .venv/bin/python benchmarks/leaderboard_overhead.py [--rounds 3] [--threads N] [--skip-per-method] [--methods a,b]
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shutil
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader

from oodbench.benchmark.extraction import extract
from oodbench.benchmark.fitting import fit_cached
from oodbench.benchmark.jobs import ExtractJob, ScoreJob
from oodbench.benchmark.plan import Plan, benchmark_splits, search_space_for
from oodbench.benchmark.runner import run_experiment
from oodbench.benchmark.search import search_hyperparameters
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.metrics.detection import ood_metrics
from oodbench.models.adapter import ModelContext, ModelSpec, load_model
from oodbench.postprocessors import weiper
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


@contextlib.contextmanager
def stage_clock() -> dict[str, float]:
    """CPU seconds spent in the run's stages while the block runs: 'listing' (the splits
    listed and fingerprinted), 'extraction', 'scoring:<method>' per scoring job."""
    spent: dict[str, float] = collections.Counter()
    patched = [(Plan, "resolve", lambda *a, **k: "listing"), (ExtractJob, "run", lambda *a, **k: "extraction"),
               (ScoreJob, "run", lambda job, *a, **k: f"scoring:{job.postprocessor}")]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patched]

    def clocked(function, stage):
        @functools.wraps(function)
        def run(*args, **kwargs):
            start = cpu_seconds()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage(*args, **kwargs)] += cpu_seconds() - start
        return run

    for (owner, name, stage), (_, _, original) in zip(patched, originals):
        function = original.__func__ if isinstance(original, classmethod) else original
        wrapped = clocked(function, stage)
        setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def breakdown(spent: dict[str, float], total: float, floor: float) -> str:
    """One line per stage of an oodbench round, its CPU seconds and what is above the floor."""
    scoring = {stage.split(":", 1)[1]: seconds for stage, seconds in spent.items() if stage.startswith("scoring:")}
    costliest = sorted(scoring.items(), key=lambda item: -item[1])
    named = ", ".join(f"{name} {seconds:.2f}" for name, seconds in costliest[:6])
    rest = total - sum(spent.values())
    return (f"oodbench's median round, CPU s: {total:.2f} = listing and fingerprints {spent.get('listing', 0):.2f}"
            f" + extraction {spent.get('extraction', 0):.2f} (bare decode + forward {floor:.2f}) + scoring "
            f"{sum(scoring.values()):.2f} ({len(scoring)} jobs; {named}; the other {len(costliest[6:])} "
            f"{sum(s for _, s in costliest[6:]):.2f}) + the rest (model load, store) {rest:.2f}")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--skip-per-method", action="store_true",
                            help="time bare and oodbench only (the per-method way takes ~20x)")
        parser.add_argument("--methods", help="comma-separated output-based postprocessors (default: all of them)")

    args, work, setup = benchmark_arguments(__doc__.split("\n\n")[0], "oodbench-overhead-", options)
    methods = output_based()
    if args.methods:
        unknown = set(args.methods.split(",")) - set(methods)
        if unknown:
            raise SystemExit(f"not output-based postprocessors: {', '.join(sorted(unknown))}")
        methods = args.methods.split(",")

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
        weiper._MEMO.clear()  # a fresh run: WeiPer's values remembered in this process are not reused
        weiper._DIGESTS.clear()
        where = work / f"run{round_}"
        config = {"benchmark": str(setup.benchmark), "data_root": str(setup.data_root), "models": [setup.model],
                  "postprocessors": methods, "search": True, "fit_split": "val", "batch_size": BATCH_SIZE,
                  "cache_dir": str(where / "cache"), "results": str(where / "results.sqlite")}
        run_experiment(config, quiet=True)
        shutil.rmtree(where)

    ways = {"bare": lambda r: bare(model, datasets), "oodbench": oodbench_run}
    if not args.skip_per_method:
        ways["per-method"] = lambda r: per_method_inference(model, datasets, methods, groups)
    wall: dict[str, list[float]] = {way: [] for way in ways}
    cpu: dict[str, list[float]] = {way: [] for way in ways}
    stages: list[dict[str, float]] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for way, fn in ways.items():
            with stage_clock() as spent:
                start, start_cpu = time.perf_counter(), cpu_seconds()
                fn(round_)
            if round_:
                wall[way].append(time.perf_counter() - start)
                cpu[way].append(cpu_seconds() - start_cpu)
                if way == "oodbench":
                    stages.append(dict(spent))
    ratio = lambda seconds, a, b: statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))  # noqa: E731
    print(f"{setup.what}; {images:,} images ({', '.join(f'{n} {len(d):,}' for n, d in datasets.items())}); "
          f"{len(methods)} output-based postprocessors with search, fit on ID val: {', '.join(methods)}; "
          f"threads {torch.get_num_threads()}, batch {BATCH_SIZE}; medians of {args.rounds} interleaved rounds "
          f"after a warm-up; load average {os.getloadavg()[0]:.1f}")
    for way in ways:
        print(f"{way:10s} wall {statistics.median(wall[way]):8.2f} s (rounds {', '.join(f'{s:.2f}' for s in wall[way])})"
              f"   CPU {statistics.median(cpu[way]):8.2f} s (rounds {', '.join(f'{s:.2f}' for s in cpu[way])})")
    median_round = sorted(range(args.rounds), key=lambda r: cpu["oodbench"][r])[args.rounds // 2]
    print(breakdown(stages[median_round], cpu["oodbench"][median_round], cpu["bare"][median_round]))
    if "per-method" in ways:
        print(f"median of the rounds' ratios: per-method inference / oodbench wall {ratio(wall, 'per-method', 'oodbench'):.1f}x, "
              f"CPU {ratio(cpu, 'per-method', 'oodbench'):.1f}x (goal >= 10)")
    print(f"median of the rounds' ratios: oodbench / bare decode + forward wall {ratio(wall, 'oodbench', 'bare'):.2f}, "
          f"CPU {ratio(cpu, 'oodbench', 'bare'):.2f} (goal <= 1.15)")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
