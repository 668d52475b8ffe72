"""A finished run, read back: a config, its benchmark, and the cached outputs of each
(model, split). The tasks (`oodbench.tasks`: operating point, calibration under noise, ...) and the plots
share it; it never extracts or trains — a missing entry says to run the experiment."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from oodbench.storage.caches import FitStateCache, OutputCache
from oodbench.benchmark.config import ExperimentConfig, load_config
from oodbench.benchmark.fitting import fit_cached
from oodbench.benchmark.jobs import RunContext, get_model, load_cached_outputs
from oodbench.benchmark.plan import Plan, resolve_postprocessors
from oodbench.benchmark.reads import attach
from oodbench.benchmark.runner import resolve_device
from oodbench.datasets.benchmarks import Benchmark, load_benchmark
from oodbench.errors import OodbenchError
from oodbench.models.adapter import ModelSpec
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.registry import POSTPROCESSORS, load_plugins
from oodbench.storage.store import ResultStore


@dataclass
class CachedExperiment:
    """A config's benchmark, models and cached outputs; never extracts or trains."""

    config: ExperimentConfig
    benchmark: Benchmark
    plan: Plan

    @classmethod
    def open(cls, path: str | Path, **overrides: Any) -> "CachedExperiment":
        config = load_config(path, **overrides)
        load_plugins(config.plugins, strict=True)
        benchmark = load_benchmark(config.benchmark)
        plan = Plan.resolve(config, benchmark, resolve_postprocessors(config.postprocessors, config.plugins), every_split=True)
        return cls(config, benchmark, plan)

    @property
    def splits(self):
        return self.plan.splits

    @cached_property
    def store(self) -> ResultStore:
        return ResultStore(self.config.results, readonly=True)

    @property
    def run_first(self) -> str:
        from oodbench.benchmark.cells import run_first

        store = self.store if Path(self.config.results).expanduser().is_file() else None
        return run_first(store, self.benchmark.name, self.config.source, self.config.limit)

    def context(self, spec: ModelSpec) -> RunContext:
        """The model's run context, with its own test transform when it has one (as in the run)."""
        context = RunContext.of(self.config, spec, self.benchmark.image, resolve_device(self.config.device),
                                self.plan.token)
        preprocessing = get_model(spec, context.model_context).preprocessing
        return replace(context, image=self.benchmark.image.for_model(preprocessing))

    def model(self, spec: ModelSpec):
        return get_model(spec, self.context(spec).model_context)

    def key(self, spec: ModelSpec, split: str) -> str:
        model = self.model(spec)
        return self.plan.output_key(split, model.identity, model.weights_hash, self.context(spec).image)

    def has(self, spec: ModelSpec, split: str) -> bool:
        return self.plan.present(split) and OutputCache(self.config.cache_dir).has(self.key(spec, split))

    def outputs(self, spec: ModelSpec, split: str, with_model: bool = False, statistics: tuple = (),
                with_weights: bool = False) -> Outputs:
        """Cached outputs of one split; `with_model` also attaches the model and the images,
        `with_weights` the model alone (for its parameters), and `statistics` the cached layer
        statistics (`oodbench.benchmark.reads`)."""
        if split not in self.splits or not self.has(spec, split):
            raise OodbenchError(f"no cached outputs of {spec.display} on {split}; {self.run_first}")
        outputs = load_cached_outputs(self.context(spec), self.splits[split], self.key(spec, split),
                                      self.model(spec) if with_model else None)
        if with_weights:
            outputs.model = self.model(spec)
        return attach(outputs, self.config.cache_dir, self.key(spec, split), statistics, {})

    def ood_tests(self, spec: ModelSpec) -> dict[str, str]:
        """OOD test split name -> near | far, for the sets cached for `spec` (a warning names the rest)."""
        groups = {f"{g}:{n}": g for g, sets in (("near", self.benchmark.near), ("far", self.benchmark.far))
                  for n in sets}
        absent = [s for s in groups if not self.has(spec, s)]
        if absent:
            warnings.warn(f"{spec.display}: no cached outputs for {', '.join(absent)} (missing data, or "
                          f"{self.run_first}); left out", stacklevel=2)
        present = {s: g for s, g in groups.items() if s not in absent}
        if not present:
            raise OodbenchError(f"no cached OOD outputs of {spec.display}; {self.run_first}")
        return present

    def selected(self, postprocessors: list[str] | None = None, models: list[str] | None = None
                 ) -> tuple[list[str], list[ModelSpec]]:
        """The run's postprocessors and model entries named by a command's filters (None:
        all of them), in the config's order. Raises OodbenchError naming every name that is
        not part of the run, so a typo is never a silently shorter table."""
        unknown = [n for n in postprocessors or [] if n not in self.plan.methods]
        if unknown:
            raise OodbenchError(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                                f"a postprocessor of {self.config.source} (it has: {', '.join(self.plan.methods)}); "
                                f"add it there and {self.run_first}")
        displays = [spec.display for spec in self.config.models]
        unknown = [m for m in models or [] if m not in displays]
        if unknown:
            raise OodbenchError(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                                f"a model of {self.config.source} (it has: {', '.join(displays)})")
        names = list(self.plan.methods) if not postprocessors else [n for n in self.plan.methods if n in postprocessors]
        return names, [spec for spec in self.config.models if not models or spec.display in models]

    def cell(self, spec: ModelSpec, name: str):
        """The stored done cell (a one-row frame of ``cells``) of postprocessor `name` on `spec`
        under this config's setting and data."""
        if name not in self.plan.methods:
            raise OodbenchError(f"'{name}' is not a postprocessor of {self.config.source}; add it there and "
                                f"{self.run_first}")
        model = self.model(spec)
        fingerprint = self.plan.cell_fingerprint(name, model.identity, model.weights_hash, self.context(spec).image)
        cells = self.store.frame("cells", benchmark=self.benchmark.name, model=spec.model_label, postprocessor=name,
                                 fingerprint=fingerprint, status="done")
        if cells.empty:
            raise OodbenchError(f"no '{name}' result for {spec.display} ({self.plan.methods[name].setting}) on this "
                                f"data in {self.store.path}; {self.run_first}")
        return cells.iloc[:1]

    def stored_scores(self, spec: ModelSpec, name: str, dataset: str = "id_test") -> np.ndarray | None:
        """The per-image test scores the run stored for this cell on `dataset` (``id_test`` or an
        OOD set's name), verified by checksum; None where the store has none (older stores)."""
        fingerprint = self.cell(spec, name).fingerprint.iloc[0]
        found, _ = self.store.read_scores([fingerprint])
        return found.get(fingerprint, {}).get(dataset)

    def fitted(self, spec: ModelSpec, name: str) -> Postprocessor:
        """The postprocessor with the hyperparameters of its stored cell, fitted as in the run."""
        cells = self.cell(spec, name)
        cls = POSTPROCESSORS.get(name)
        method = cls(**json.loads(cells.params.iloc[0] or "{}"))
        if cls.needs_fit:
            fit_split = self.fit_splits[0]
            read = dict(with_model=cls.needs_model, statistics=method.layer_statistics(),
                        with_weights=cls.needs_weights)
            fit_cached(method, lambda: self.outputs(spec, fit_split, **read),  # read only to fit
                       self.outputs(spec, "id:val", **read), FitStateCache(self.config.cache_dir),
                       self.fit_keys(spec, name))
        return method

    @property
    def fit_splits(self) -> tuple[str, str]:
        """The splits a method fits on: (the fit split, the ID validation split)."""
        return ("id:fit" if "id:fit" in self.splits else "id:val", "id:val")

    def fit_keys(self, spec: ModelSpec, name: str) -> list[str]:
        """The output keys of the splits `name` was fitted on ([] for a method that does not fit)."""
        return [self.key(spec, s) for s in self.fit_splits] if POSTPROCESSORS.get(name).needs_fit else []

    @property
    def device(self) -> str:
        return resolve_device(self.config.device)

    def scores(self, method: Postprocessor, spec: ModelSpec, split: str) -> np.ndarray:
        outputs = self.outputs(spec, split, with_model=method.needs_model, statistics=method.layer_statistics(),
                               with_weights=method.needs_weights)
        return method.score(outputs).detach().cpu().double().numpy()
