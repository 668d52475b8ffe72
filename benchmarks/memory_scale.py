"""Memory that does not grow with the data: peak anonymous resident memory (``RssAnon``
of /proc/self/status: memory-mapped cache pages the kernel can drop do not count) and
single-thread CPU seconds of each stage a fit split goes through, at several sizes of
synthetic outputs of ResNet-50's widths (2,048-d features, 1,000 classes), with the growth
fitted (GiB per million images) and extended to ImageNet-1K's 1.28M training images.

Stages, in a fresh one-thread process per size (glibc told to return every freed block
over 64 KiB, so one stage's freed memory does not hide the next one's growth): ``extract`` (`cache.extract` of N synthetic images into the
output cache), ``read`` (reading the entry back and what `ExtractJob` checks on it), and
per fitted output/feature method: ``fit:<m>`` (its fit on the N-image entry),
``state:<m>`` (its fit state saved to and loaded from the fit-state cache) and
``score:<m>`` (scoring a fixed test split with that state; KNN's bank is the N images).
A stage's peak is its RssAnon high-water mark above the level when it started, sampled
every millisecond by a thread.

    .venv/bin/python benchmarks/memory_scale.py [--quick] [--sizes 20000,50000,100000]
        [--methods mds,knn,...] [--against /path/to/other/checkout] [--dir /tmp/x]

``--quick`` (2k-10k images) is a smoke run: its sizes are below the fixed block sizes
(4,096-row blocks, 16,384-row KNN and Relation bank blocks, 4M-value percentile blocks),
so its slopes show blocks filling up, not growth; measure growth from 40k images up.
``--against`` times the largest size's stages again with another checkout's code (e.g.
the one before streaming fits) and prints the CPU ratio; ``--code`` measures another
checkout instead of this one (to run both side by side). The last line is
``worst slope X.XX GiB per million images (stage)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FEATURES, CLASSES, PIXELS = 2048, 1000, 3 * 16 * 16
IMAGENET = 1.281167  # million training images
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def measured(work) -> dict:
    """Run `work()`; its peak RssAnon above the level at its start (GiB) and its CPU seconds."""
    start, peak, running = rss_anon(), [rss_anon()], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = time.process_time()
    try:
        work()
    finally:
        cpu = time.process_time() - cpu
        running[0] = False
        sampler.join()
    peak[0] = max(peak[0], rss_anon())
    return {"gib": (peak[0] - start) / 2**30, "cpu": cpu}


# ----------------------------------------------------------------------------- one stage


def synthetic_model():
    """Images carry their class in their first pixel; features are ReLU(class centre + noise
    projection), logits come from a classifier aligned with the centres (most predictions right)."""
    import torch
    from torch import nn

    from oodbench.models.adapter import ModelAdapter

    class Synthetic(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.centres = nn.Parameter(torch.randn(CLASSES, FEATURES, generator=gen).relu(), requires_grad=False)
            self.mix = nn.Parameter(torch.randn(PIXELS, FEATURES, generator=gen) / PIXELS ** 0.5, requires_grad=False)
            self.fc = nn.Linear(FEATURES, CLASSES)
            self.fc.weight.data = self.centres / self.centres.norm(dim=1, keepdim=True) * 4

        def forward(self, x):
            label = (x[:, 0, 0, 0] * CLASSES).long().clamp(0, CLASSES - 1)
            return self.fc((self.centres[label] + x.flatten(1) @ self.mix).relu())

    return ModelAdapter(Synthetic(), num_classes=CLASSES, identity="synthetic-resnet50-widths")


class Images:
    """`size` synthetic images (3 x 16 x 16, seeded by index) and their labels."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        import torch

        label = (index * 7919 + self.seed) % CLASSES
        image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(self.seed * 10**7 + index))
        image[0, 0, 0] = (label + 0.5) / CLASSES
        return image, label


def worker(stage: str, size: int, folder: Path, score_rows: int, methods: list[str]) -> dict:
    """``prepare`` (the validation and test splits every fit and score reads), or every stage at `size`."""
    import gc

    import torch

    from oodbench.storage.caches import FitStateCache, OutputCache
    from oodbench.benchmark.extraction import extract
    from oodbench.benchmark.jobs import nonfinite_count
    try:
        from oodbench.benchmark.fitting import restore_fit_state, store_fit_state
    except ImportError:  # --against a checkout from before fit views: the whole state, saved and loaded
        def store_fit_state(method, states, key):
            return states.save(key, method.fit_state())

        def restore_fit_state(method, states, key, fit):
            method.load_fit_state(states.load(key))
    from oodbench.metrics.detection import accuracy
    from oodbench.registry import POSTPROCESSORS

    torch.set_num_threads(1)
    cache = OutputCache(folder)
    key = lambda name, n: f"memory-scale {name} {n}"  # noqa: E731
    model = synthetic_model()
    if stage == "prepare":
        for name, n, seed in (("val", 2000, 1), ("test", score_rows, 2)):
            if cache.load(key(name, n)) is None:
                extract(model, Images(n, seed), batch_size=500, cache=cache, key=key(name, n))
        return {}
    results = {}

    def stage_of(name: str, work) -> None:
        gc.collect()
        try:
            results[name] = measured(work)
        except Exception as exc:  # a method that cannot fit these outputs: its row says why
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:80]}
        value = results[name]
        print(f"  {size} {name}: " + (f"{value['gib']:.3f} GiB, {value['cpu']:.1f} s" if "error" not in value
                                      else value["error"]), file=sys.stderr, flush=True)

    stage_of("extract", lambda: extract(model, Images(size, 0), batch_size=500, cache=cache, key=key("fit", size)))

    def read() -> None:
        outputs = cache.load(key("fit", size))
        nonfinite_count(outputs.logits)
        accuracy(outputs.logits.numpy(), outputs.labels.numpy())

    stage_of("read", read)
    val, test = cache.load(key("val", 2000)), cache.load(key("test", score_rows))
    states = FitStateCache(folder)
    for name in methods:
        train = cache.load(key("fit", size))
        method = POSTPROCESSORS.get(name)()
        stage_of(f"fit:{name}", lambda: method.fit(train, val))
        if "error" in results[f"fit:{name}"]:
            continue

        def round_trip() -> None:  # as `fit_cached` does: views of the fit outputs are not stored
            cached = getattr(type(method), "cache_fit", True)  # Relation's state is the mapped outputs
            if cached and store_fit_state(method, states, key(name, size)):
                restore_fit_state(method, states, key(name, size), train)

        stage_of(f"state:{name}", round_trip)
        stage_of(f"score:{name}", lambda: method.score(test))
        method = train = None  # released before the next method loads its fit split
    cache.path(key("fit", size)).unlink(missing_ok=True)  # its disk back for the next size
    return results


def fitted_methods() -> list[str]:
    """Registered methods that fit on cached outputs alone (no model, layers, extras or ensembles)."""
    from oodbench.registry import POSTPROCESSORS

    return sorted(entry.name for entry in POSTPROCESSORS.entries()
                  if entry.obj.needs_fit and not entry.obj.needs_model and not entry.obj.needs_layers
                  and not entry.obj.needs_extras and not entry.obj.needs_checkpoints)


# ----------------------------------------------------------------------------- the driver


def run_worker(stage: str, size: int, folder: Path, score_rows: int, methods: list[str], code: Path,
               timeout: float) -> dict:
    """One fresh one-thread process; glibc returns every block over 64 KiB to the system when
    freed, so one stage's freed memory does not hide the next one's growth."""
    command = [sys.executable, __file__, "--worker", stage, "--size", str(size), "--dir", str(folder),
               "--score-rows", str(score_rows), "--methods", ",".join(methods)]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(code), "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    try:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"extract": {"error": f"over {timeout:.0f} s"}}
    if done.returncode != 0:
        return {"extract": {"error": f"exit {done.returncode}"}}
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(sizes: list[int], values: list[float]) -> float:
    """GiB per million images: the least-squares line through (size in millions, GiB); of one
    size, the line through the origin (all of its peak taken as growth)."""
    if len(sizes) == 1:
        return values[0] / (sizes[0] / 1e6)
    return float(np.polyfit(np.array(sizes) / 1e6, values, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,50000,100000")
    parser.add_argument("--quick", action="store_true", help="sizes 2000,5000,10000 and 1,000 test images")
    parser.add_argument("--methods", default=None, help="comma-separated; default: every fitted output method")
    parser.add_argument("--score-rows", type=int, default=10000)
    parser.add_argument("--against", type=Path, default=None, help="another checkout: its times at the largest size")
    parser.add_argument("--code", type=Path, default=None, help="measure another checkout's code instead of this one")
    parser.add_argument("--dir", type=Path, default=None, help="cache folder (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else fitted_methods()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.dir, args.score_rows, methods)))
        return
    sizes = [2000, 5000, 10000] if args.quick else [int(s) for s in args.sizes.split(",")]
    score_rows = 1000 if args.quick else args.score_rows
    root = args.code or Path(__file__).resolve().parents[1]
    folder = args.dir or Path(tempfile.mkdtemp(prefix="memory-scale-"))
    runs = [("this", root, sizes)] + ([("against", args.against, sizes[-1:])] if args.against else [])
    results: dict[tuple[str, str], dict[int, dict]] = {}
    try:
        for tag, code, run_sizes in runs:
            run_worker("prepare", 0, folder / tag, score_rows, methods, code, args.timeout)
            for size in run_sizes:
                print(f"{tag} code, {size:,} images:", file=sys.stderr, flush=True)
                for name, value in run_worker("all", size, folder / tag, score_rows, methods, code,
                                              args.timeout).items():
                    results.setdefault((tag, name), {})[size] = value
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    report(results, sizes, args.against is not None)


def report(results: dict, sizes: list[int], against: bool) -> None:
    header = ["stage", *(f"GiB@{s // 1000}k" for s in sizes), "GiB/M", "GiB@1.28M",
              *(f"cpu s@{s // 1000}k" for s in sizes), *(["cpu vs other"] if against else [])]
    rows, worst = [], (float("-inf"), "")
    for (tag, stage), by_size in sorted(results.items(), key=lambda item: item[0][1]):
        if tag != "this":
            continue
        if any("error" in by_size.get(s, {}) for s in sizes):
            error = next(by_size[s]["error"] for s in sizes if "error" in by_size.get(s, {}))
            rows.append([stage, f"failed: {error}"])
            continue
        peaks = [by_size[s]["gib"] for s in sizes]
        growth = slope(sizes, peaks)
        line = [stage, *(f"{p:.3f}" for p in peaks), f"{growth:.2f}", f"{peaks[-1] + growth * (IMAGENET - sizes[-1] / 1e6):.2f}",
                *(f"{by_size[s]['cpu']:.1f}" for s in sizes)]
        if against:
            other = results.get(("against", stage), {}).get(sizes[-1], {})
            line.append(f"{by_size[sizes[-1]]['cpu'] / other['cpu']:.2f}x" if other.get("cpu") else "-")
        rows.append(line)
        worst = max(worst, (growth, stage))
    widths = [max(len(str(row[i])) for row in [header, *rows] if i < len(row)) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print(f"worst slope {worst[0]:.2f} GiB per million images ({worst[1]})")


if __name__ == "__main__":
    main()
