"""From an experiment config to rows in the results store: the driver.

The run reads like the data flow: resolve the plan (list and fingerprint every split the
run reads) -> load each model once (`ProbeJob`: identity, weights hash, a one-image check
that it fits the benchmark) -> name every cell by its fingerprint and skip those already
in the store -> extract the outputs the pending cells need (`ExtractJob`, cached) ->
score (`ScoreJob`) -> store -> the table of exactly this run's cells.

Result rows reach the store through the driver only (this process). A model that fails to
load or extract has its cells marked failed with the reason and the rest of the grid goes
on; when no model can be used the run stops with the first reason. One progress bar counts
every job, and a summary of where the time went (extraction vs scoring, per model) ends
the run.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from contextlib import closing, contextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from oodbench.version import __version__
from oodbench.benchmark.config import CACHE_OPTIONS, DATA_ROOT_OPTIONS, ExperimentConfig, load_config
from oodbench.benchmark.executors import Executor, make_executor
from oodbench.benchmark.jobs import ExtractJob, ProbeJob, RunContext, ScoreJob
from oodbench.benchmark.reads import (checkpoint_groups, group_weights, member_keys, required_statistics,
                                     statistics_by_split)
from oodbench.benchmark.plan import (ALWAYS, Plan, check_compatible, model_placeholder, resolve_params,
                                   resolve_postprocessors, search_space_for)
from oodbench.datasets.benchmarks import Benchmark, load_benchmark
from oodbench.benchmark.conventions import load_conventions
from oodbench.datasets.base import load_dataset
from oodbench.datasets.transform import ImageSpec, source_crop
from oodbench.errors import DatasetMissing, OodbenchError, failure_line, writable_folder
from oodbench.registry import MODELS, POSTPROCESSORS, load_plugins
from oodbench.storage.store import FALLBACK, Cell, ResultStore


@lru_cache(maxsize=1)
def git_hash() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise OodbenchError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OodbenchError(f"device '{device}' requested but CUDA is not available here")
    return device


def default_threads() -> int:
    """torch threads when neither ``--threads`` nor the config says: torch's own default, one
    per physical core (benchmarks/threads_speed.py; the rule is in the README)."""
    return torch.get_num_threads()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: `default_threads()`) in this process
    for the block, then restored (a caller of the Python API keeps its own)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_config(config: ExperimentConfig, benchmark: Benchmark | None = None) -> list[str]:
    """Everything about a config that can fail without data: plugins, names, hyperparameters
    (every fixed value and every searched one), model sources. Returns the postprocessors."""
    load_plugins(config.plugins, strict=True)
    if benchmark is None:
        benchmark = load_benchmark(config.benchmark)
    names = resolve_postprocessors(config.postprocessors, config.plugins)
    params = resolve_params(names, config.params)
    conventions = load_conventions(config.conventions)
    for name in names:
        method = POSTPROCESSORS.get(name)
        method(**{**conventions.method_params(method.name or name, benchmark.name), **params.get(name, {})})
        if config.search:  # bad values fail before any work, and so do bad searched values
            search_space_for(name, method, conventions)
    for spec in config.models:
        MODELS.get(spec.source)
    return names


BENCHMARK_TRANSFORM = "the benchmark's"


def transform_note(image: ImageSpec, plan: Plan, data_root: str) -> str:
    """A model's test transform in words, and whose it is, as table captions name it: what ran,
    the sources' own ``resize_crop`` of the splits read included."""
    crops = [source_crop(load_dataset(split.ref, data_root, image, ood=split.ood, memo=plan.token))
             for name, split in plan.splits.items() if plan.present(name)]
    return f"{image.describe(crops)} ({image.origin or BENCHMARK_TRANSFORM})"


def time_summary(timing: dict[str, dict[str, float]], wall: float) -> str:
    """Where the time went: seconds spent in extraction and scoring jobs, per model."""
    from tabulate import tabulate

    rows = [[model, f"{t['extraction']:.1f}", f"{t['scoring']:.1f}"] for model, t in timing.items()]
    rows.append(["total", f"{sum(t['extraction'] for t in timing.values()):.1f}",
                 f"{sum(t['scoring'] for t in timing.values()):.1f}"])
    return (f"time: {wall:.1f} s wall; job seconds per model (summed over jobs, which may run in parallel):\n"
            + tabulate(rows, headers=["model", "extraction s", "scoring s"]))


def run_experiment(config: str | Path | dict | ExperimentConfig, executor: Executor | str = "local",
                   executor_options: dict[str, Any] | None = None, quiet: bool = False,
                   resolved_benchmark: Benchmark | None = None, **overrides: Any):
    """Run (or resume) an experiment and return the leaderboard DataFrame of its cells.

    `resolved_benchmark`: a `Benchmark` built in Python (oodbench.evaluate's in-memory data),
    run instead of loading ``config.benchmark``."""
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, **overrides)
    names = check_config(config, resolved_benchmark)
    writable_folder(config.cache_dir, "cache folder", CACHE_OPTIONS)
    device = resolve_device(config.device)
    if isinstance(executor, str):  # an executor made here is closed here (a local Ray instance shut down)
        with closing(make_executor(executor, **(executor_options or {}))) as made:
            return run_experiment(config, made, quiet=quiet, resolved_benchmark=resolved_benchmark)
    with torch_threads(config.threads):
        return _run(config, executor, names, device, quiet, resolved_benchmark)


def _run(config: ExperimentConfig, executor: Executor, names: list[str], device: str, quiet: bool,
         resolved_benchmark: Benchmark | None):
    """`run_experiment` once its config is checked, its executor made and its threads set."""
    from oodbench.benchmark.leaderboard import leaderboard_frame

    started = time.time()
    benchmark = resolved_benchmark if resolved_benchmark is not None else load_benchmark(config.benchmark)
    store = ResultStore(config.results)
    plan = Plan.resolve(config, benchmark, names)
    if not plan.present("id:test"):
        reason, root = plan.states["id:test"].reason, Path(config.data_root).expanduser()
        if not root.exists():  # said first: no dataset of the benchmark can be there
            reason = f"data root {root} does not exist ({DATA_ROOT_OPTIONS}); {reason}"
        raise DatasetMissing(reason)
    for line in plan.changed_splits(store.last_split_fingerprints(benchmark.name)):
        warnings.warn(line, stacklevel=2)
    contexts = {spec.display: RunContext.of(config, spec, benchmark.image, device, plan.token, progress=not quiet)
                for spec in config.models}
    progress = tqdm(total=len(contexts), desc="grid", unit="job", disable=quiet)
    timing = {display: {"extraction": 0.0, "scoring": 0.0} for display in contexts}

    def finished(job) -> None:
        progress.set_postfix_str(job.label[-60:], refresh=False)
        progress.update()

    # load each model once: identity, weights hash, does it fit the benchmark
    probes: dict[str, dict[str, Any]] = {}
    failures: dict[str, BaseException] = {}
    for job, result in executor.map([ProbeJob(c) for c in contexts.values()], desc="load"):
        finished(job)
        if isinstance(result, Exception):
            failures[job.context.model.display] = result
        else:
            probes[job.context.model.display] = result
    if failures and len(failures) == len(contexts):
        progress.close()
        raise next(iter(failures.values()))  # no model to score: stop with the first reason
    for display, probe in probes.items():  # each model reads the data through its own transform, if it has one
        check_compatible(display, probe, benchmark)
        contexts[display] = replace(contexts[display], image=benchmark.image.for_model(probe["preprocessing"]))

    # every cell by its fingerprint; those already in the store are done
    # (an ensemble method has one cell per model entry, on its first checkpoint, named by all their weights)
    fingerprints = {}
    groups = checkpoint_groups(config.models)
    for spec in config.models:
        probe = probes.get(spec.display)
        identity, weights = (probe["identity"], probe["weights_hash"]) if probe else (model_placeholder(spec), "")
        image, group = contexts[spec.display].image, groups[spec.display]
        ensembles = {n for n in names if plan.methods[n].cls.needs_checkpoints}
        fingerprints[spec.display] = {
            n: plan.cell_fingerprint(n, identity, group_weights(probes, group) if n in ensembles else weights, image)
            for n in names if n not in ensembles or group[0] == spec.display}
    done = store.done_fingerprints(benchmark.name)
    pending = {d: [n for n in fingerprints[d] if fingerprints[d][n] not in done] for d in fingerprints}
    provenance = {"benchmark_version": benchmark.version, "oodbench_version": __version__,
                  "git_hash": git_hash(), "config_hash": config.digest, "fpr_convention": config.fpr}

    notes = {display: transform_note(context.image, plan, config.data_root) for display, context in contexts.items()}

    def cell_base(display: str, name: str) -> dict[str, Any]:
        spec = contexts[display].model
        weights = probes[display]["weights_hash"] if display in probes else None
        members = groups[display] if plan.methods[name].cls.needs_checkpoints else [display]
        checkpoint = "+".join(contexts[d].model.member or "" for d in members)
        return dict(benchmark=benchmark.name, model=spec.model_label, checkpoint=checkpoint, postprocessor=name,
                    setting=plan.methods[name].setting, fingerprint=fingerprints[display][name],
                    data_fingerprint=plan.fingerprint, tags=list(spec.tags),
                    provenance={**provenance, "weights_hash": weights},
                    preprocessing=notes[display])

    def fail_model(display: str, reason: str) -> None:
        for name in pending[display]:
            store.write_cell(Cell(**cell_base(display, name), status="failed", reason=reason))
        pending[display] = []

    for display, exc in failures.items():
        fail_model(display, f"model could not be loaded: {failure_line(exc)}")

    # extract what the pending cells read (each split once per model)
    extract_jobs = []
    borrowed = {d: [plan.methods[n] for leader in group if leader in pending for n in pending[leader]
                    if plan.methods[n].cls.needs_checkpoints and leader != d] for d, group in groups.items()}
    for display, names_left in pending.items():
        probe = probes.get(display)
        if not (names_left or borrowed[display]) or probe is None:
            continue
        statistics = statistics_by_split([plan.methods[n] for n in names_left])
        needed = {s for m in [*map(plan.methods.get, names_left), *borrowed[display]] for s in [*m.splits, *ALWAYS]
                  if plan.present(s)}
        keys = {s: plan.output_key(s, probe["identity"], probe["weights_hash"], contexts[display].image)
                for s in plan.splits if s in needed}
        extract_jobs += [ExtractJob(contexts[display], plan.splits[s], key, statistics.get(s, ()))
                         for s, key in keys.items()]
        probe["keys"] = keys
    progress.total += len(extract_jobs) + sum(map(len, pending.values()))
    progress.refresh()
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for job, result in executor.map(extract_jobs, desc="extract"):
        finished(job)
        display = job.context.model.display
        if isinstance(result, Exception):
            failures.setdefault(display, result)
            continue
        reports.setdefault(display, {})[job.split.name] = result
        timing[display]["extraction"] += result["seconds"]

    extract_failures = {d: exc for d, exc in failures.items() if d in probes and pending[d]}
    if extract_failures and all(d in failures for d in pending if pending[d]):
        progress.close()
        raise next(iter(extract_failures.values()))  # no model left to score: stop with the first reason
    score_jobs = []
    missing_sets = sorted({s.split(":", 1)[1] for s, state in plan.states.items()
                           if not state.present and s.split(":")[0] in ("csid", "near", "far", "ood_val")})
    for display, names_left in pending.items():
        if not names_left:
            if display in probes:  # all stored: still the data this run read (the latest run's)
                store.mark_read(benchmark.name, contexts[display].model.model_label, plan.fingerprint)
            continue
        if display in failures:
            fail_model(display, f"extraction failed: {failure_line(failures[display])}")
            continue
        report = reports.get(display, {})
        store.write_datasets(benchmark.name, contexts[display].model.model_label, [
            {"dataset": split if split.split(":")[0] in ("id", "ood_val") else split.split(":", 1)[1],
             "group": split.split(":")[0], "fingerprint": state.fingerprint, "available": state.available,
             "status": "present" if state.present else "missing", "reason": report.get(split, {}).get("reason")
             or state.reason or (f"{FALLBACK}{state.fallback}" if state.fallback else None), "samples": state.samples, "accuracy": report.get(split, {}).get("accuracy")}
            for split, state in plan.states.items()], plan.fingerprint)  # the data as found (changed_splits)
        keys = dict(probes[display]["keys"])
        for name in names_left:
            method = plan.methods[name]
            if f"id:{method.fit_split}" in keys:  # the split its fit reads (the profile may name one)
                keys["id:fit"] = keys[f"id:{method.fit_split}"]
            else:
                keys.pop("id:fit", None)
            score_jobs.append(ScoreJob(
                context=contexts[display], postprocessor=name, params=method.params, space=method.space,
                splits=plan.splits, keys={s: keys[s] for s in [*method.splits, "id:fit"] if s in keys},
                groups={**{n: "csid" for n in benchmark.csid}, **{n: "near" for n in benchmark.near},
                        **{n: "far" for n in benchmark.far}},
                plugins=tuple(config.plugins), cell_base=cell_base(display, name), search_limit=method.search_limit,
                conventions=config.conventions,
                statistics=required_statistics(method.cls, method.params, method.space),
                members=member_keys(groups[display][1:], probes, {d: contexts[d].model.member for d in groups[display]},
                                    method.splits) if method.cls.needs_checkpoints else {}))
    if missing_sets and not quiet:
        warnings.warn(f"missing datasets (marked missing in the table): {', '.join(missing_sets)}", stacklevel=2)

    for job, cell in executor.map(score_jobs, desc="score"):
        finished(job)
        if isinstance(cell, OodbenchError):  # a broken method contract or a full disk stops the run
            progress.close()
            raise cell
        if isinstance(cell, Exception):  # the job never returned (its worker was lost)
            cell = Cell(**job.cell_base, status="failed", reason=failure_line(cell))
        store.write_cell(cell)
        timing[job.context.model.display]["scoring"] += cell.seconds
    progress.close()
    models = list(dict.fromkeys(context.model.model_label for context in contexts.values()))
    frame = leaderboard_frame(store, benchmark.name, models=models, postprocessors=names, fpr=config.fpr,
                              conventions=config.conventions,
                              fingerprints=[fp for cells in fingerprints.values() for fp in cells.values()])
    store.close()
    timing = {d: t for d, t in timing.items() if t["extraction"] or t["scoring"]}
    frame.attrs["timing"] = timing
    frame.attrs["store"] = str(store.path)
    frame.attrs["limit"] = config.limit
    if timing and not quiet:
        print(time_summary(timing, time.time() - started), file=sys.stderr)
    return frame
