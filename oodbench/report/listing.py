"""What is registered and what is on disk, as `oodbench list` and `oodbench data status` print it.

Each function yields the blocks to print one after another (tables within 100 columns unless
`wide`, prose wrapped the same way), so a slow block (a model zoo, a data folder) shows
what came before it at once.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterator

from oodbench import registry
from oodbench.report.render import WIDTH, fit_table

def _prose(paragraph: str, wide: bool) -> str:
    """A blank line, then `paragraph`, wrapped to WIDTH unless `wide`."""
    return "\n" + (paragraph if wide else textwrap.fill(paragraph, WIDTH, subsequent_indent="  "))


def listing(kind: str, wide: bool = False, model_dir: str = "models", openood_dir: str = "results",
            hf_cache: str | None = None, data_root: str | None = None) -> Iterator[str]:
    """The registered `kind`: postprocessors, models, datasets, benchmarks or references (the
    published ledgers). For models also the built-in ones, the RobustBench zoo, the ImageNet
    backbones found offline under `model_dir`, `openood_dir` and `hf_cache`, and OpenOOD v1.5's
    official checkpoints under `data_root` (default: OODBENCH_DATA, else ./data)."""
    if kind == "postprocessors":
        yield from _postprocessors(wide)
    elif kind == "models":
        yield from _models(wide, model_dir, openood_dir, hf_cache, data_root)
    elif kind == "datasets":
        rows = [[entry.name, ((entry.obj.__doc__ or "").strip().splitlines() or [""])[0]]
                for entry in registry.DATASETS.entries()]
        yield fit_table(rows, ["dataset source", "description"], wide)
    elif kind == "references":
        from oodbench.report.ledger import available, load_ledger

        rows = []
        for name in available():
            ledger = load_ledger(name)
            rows.append([name, len(ledger), ", ".join(dict.fromkeys(ledger.benchmark)),
                         ", ".join(sorted(set(ledger.date))), ", ".join(dict.fromkeys(ledger.table))])
        yield fit_table(rows, ["reference", "values", "benchmarks", "dates", "tables"], wide)
    else:
        from oodbench.datasets.benchmarks import load_benchmark

        rows = []
        for name in registry.BENCHMARKS.names():
            bench = load_benchmark(name)
            rows.append([name, bench.version, ", ".join(bench.near), ", ".join(bench.far), ", ".join(bench.csid)])
        yield fit_table(rows, ["benchmark", "version", "near-OOD", "far-OOD", "shifted ID (FS-OOD)"], wide)


def _postprocessors(wide: bool) -> Iterator[str]:
    from oodbench.postprocessors.compose import PERTURBATION
    from oodbench.postprocessors.shapers import SHAPERS

    methods = registry.POSTPROCESSORS
    rows = []
    for entry in methods.entries():
        cls = entry.obj
        aliases = [n for n in methods.names() if methods.get(n) is cls and n != entry.name]
        needs = [need for need, flag in (("features", cls.needs_features), ("model gradients", cls.needs_model),
                                         ("fit", cls.needs_fit)) if flag]
        needs += [f"extras {'/'.join(cls.needs_extras)}"] if cls.needs_extras else []
        needs += ["intermediate layers"] if cls.needs_layers else []
        needs += ["every checkpoint"] if cls.needs_checkpoints else []
        needs += ["model weights"] if cls.needs_weights else []
        rows.append([cls.name or entry.name, ", ".join(aliases), entry.origin, ", ".join(needs) or "logits"])
    yield fit_table(sorted(rows), ["name", "aliases", "origin", "needs"], wide)  # by the name shown
    yield (f"\ncomposites: <shaper>+<scorer> (e.g. react+ebo, ash_s+gen), shapers {', '.join(SHAPERS)}; "
           f"{PERTURBATION}+<scorer> (ODIN's input perturbation first, e.g. odin+knn)")


def _models(wide: bool, model_dir: str, openood_dir: str, hf_cache: str | None,
            data_root: str | None) -> Iterator[str]:
    from oodbench.tasks.data import resolve_data_root
    from oodbench.models.catalog import offline_rows, release_rows
    from oodbench.models.digits import BUILTIN_MODELS
    from oodbench.models.robustbench_source import zoo_listing

    # a docstring's first paragraph, whole (its first line alone cut the openood entry at "or an")
    rows = [[entry.name, entry.origin, " ".join((entry.obj.__doc__ or "").strip().split("\n\n")[0].split())]
            for entry in registry.MODELS.entries()]
    yield fit_table(rows, ["source", "origin", "description"], wide)
    yield _prose("built-in models: " + ", ".join(BUILTIN_MODELS), wide)
    yield "\n" + zoo_listing()
    yield _prose("ImageNet backbones available offline here (weights found, or the path where they are expected):",
                 wide)
    yield fit_table(offline_rows(model_dir, openood_dir, hf_cache), ["model", "options", "weights", "path"], wide)
    yield _prose("OpenOOD v1.5's official checkpoints, by name (each seed one model; under the data root, where "
                 "`oodbench data fetch` puts them):", wide)
    yield fit_table(release_rows(resolve_data_root(data_root)),
                    ["model", "seeds", "checkpoints", "path", "get it with"], wide)


def data_status(root: Path, benchmarks: list[str] | None = None, wide: bool = False) -> Iterator[str]:
    """Per benchmark (default: every registered one), every dataset it needs under `root`:
    present or missing, sample counts, where it was found or why not; then a summary line."""
    from oodbench.datasets.benchmarks import load_benchmark
    from oodbench.tasks.data import benchmark_status

    yield f"data root: {root.resolve()}"
    for name in benchmarks or registry.BENCHMARKS.names():
        benchmark = load_benchmark(name)
        rows = benchmark_status(benchmark, root)
        yield f"\n{benchmark.name} (version {benchmark.version})"
        yield fit_table([[r.split, r.dataset, r.status, "-" if r.samples is None else f"{r.samples:,}", r.detail]
                         for r in rows], ["split", "source", "status", "samples", "from / why not"], wide)
        absent = [r.split for r in rows if r.status != "present"]
        summary = f"{len(rows) - len(absent)} of {len(rows)} present" + (f"; not present: {', '.join(absent)}"
                                                                        if absent else "")
        yield summary if wide else textwrap.fill(summary, WIDTH, subsequent_indent="  ")
