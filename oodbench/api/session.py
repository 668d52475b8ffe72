"""One API call as a harness run: live models and in-memory splits as an experiment.

`Session` lends the models (`oodbench.api.models`) and splits (`oodbench.api.data`) to
their ``python`` sources, builds a `Benchmark` of the splits (ID test/val/train, OOD
validation, near and far OOD test sets) and an `ExperimentConfig`, and runs them with the
runner `oodbench run` uses (`run_experiment`): the same plan, fingerprints, output and fit
caches, search, metrics and results store. After `run`, `experiment` reads the finished
run back (`CachedExperiment`) for the tasks (`oodbench.tasks`). Use it as a context manager: the lent
objects, and a temporary results store when none was given, live for the block only.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from oodbench.api import data as api_data
from oodbench.api import models as api_models
from oodbench.api.models import Model, adapt, borrowed, model_device
from oodbench.api.reading import Split, image_spec, ood_sets, read_split
from oodbench.benchmark.config import FPR_CONVENTIONS, ExperimentConfig
from oodbench.datasets.benchmarks import Benchmark
from oodbench.datasets.base import check_limit
from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import ModelAdapter
from oodbench.registry import POSTPROCESSORS, load_plugins

GROUPS = ("near", "far")


def default_cache_dir() -> str:
    """The output cache `oodbench run` uses: ``OODBENCH_CACHE``, else the config's default."""
    return os.environ.get("OODBENCH_CACHE", ExperimentConfig.__dataclass_fields__["cache_dir"].default)


def group_of(names: Sequence[str], groups: Mapping[str, Sequence[str]] | None) -> dict[str, str]:
    """OOD set -> near | far; sets not named in `groups` are far."""
    result = {name: "far" for name in names}
    for group, members in (groups or {}).items():
        if group not in GROUPS:
            raise OodbenchError(f"groups: unknown group '{group}'{did_you_mean(str(group), GROUPS)}; "
                                "use near and far")
        for name in [members] if isinstance(members, str) else members:
            if name not in result:
                raise OodbenchError(f"groups.{group}: '{name}' is not one of the OOD sets{did_you_mean(name, names)}; "
                                    f"they are: {', '.join(names)}")
            result[name] = group
    return result


class Session:
    """A run of live models on in-memory data (see the module doc)."""

    def __init__(self, models: list[Model], id_test: Any, ood: Any, *, postprocessors: Sequence[str],
                 fit: Any = None, val: Any = None, ood_val: Any = None, search: bool = True,
                 groups: Mapping[str, Sequence[str]] | None = None, fpr: str = "classic", store: str | None = None,
                 cache_dir: str | None = None, device: str | None = None, limit: int | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None, plugins: Sequence[str] = (),
                 batch_size: int = 256, benchmark: str = "python", head: str | None = None,
                 holdout_classes: Sequence[int] = ()):
        if fpr not in FPR_CONVENTIONS:
            raise OodbenchError(f"fpr must be one of {', '.join(FPR_CONVENTIONS)}, got {fpr!r}")
        if isinstance(postprocessors, str):
            postprocessors = [postprocessors]
        check_limit(limit, "limit")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OodbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
        load_plugins(list(plugins), strict=True)
        if head is None and len(models) == 1 and isinstance(models[0].output, str):
            head = models[0].output  # labels given per head: those of the selected output
        self.models, self.head, self.holdout = models, head, list(holdout_classes)
        self.names = [str(name) for name in postprocessors]
        test = read_split(id_test, "id_test", labeled=True)
        self.image = image_spec(test, "id_test")
        self.id_splits = {"test": test}
        seen = {"val": val, "train": fit}
        for split, value in seen.items():
            if value is not None:
                self.id_splits[split] = self._seen_only(read_split(value, "fit" if split == "train" else split, True))
        self.ood = {name: read_split(v, f"ood['{name}']", False) for name, v in ood_sets(ood, "ood").items()}
        if not self.ood:
            raise OodbenchError("ood: give at least one OOD set, {name: data}")
        self.ood_val = {name: read_split(v, f"ood_val['{name}']", False)
                        for name, v in ood_sets(ood_val, "ood_val").items()}
        self.groups = group_of(list(self.ood), groups)
        self.device = model_device(models[0].net, device)
        self.search = bool(search) and "val" in self.id_splits and bool(self.ood_val)
        self.names = self._methods()
        self.config = ExperimentConfig(
            benchmark=benchmark, models=[], postprocessors=self.names, search=self.search,
            fit_split="train" if "train" in self.id_splits else "val", fpr=fpr, plugins=list(plugins),
            params={k: dict(v) for k, v in (params or {}).items()}, results=str(store or ""),
            cache_dir=str(cache_dir or default_cache_dir()), device=self.device,
            batch_size=batch_size, limit=limit, name="python", source="oodbench.evaluate")
        self.benchmark_name = benchmark
        self._stack = ExitStack()
        self.adapters: dict[str, ModelAdapter] = {}
        self.frame = None

    def _seen_only(self, split: Split) -> Split:
        """A fit or validation split without the held-out (pseudo-novel) classes."""
        if not self.holdout:
            return split
        keep = ~torch.isin(split.labels_for(self.head), torch.tensor(self.holdout))
        if isinstance(split.labels, dict):
            return Split(split.images[keep], {head: labels[keep] for head, labels in split.labels.items()})
        return Split(split.images[keep], split.labels[keep])

    def _methods(self) -> list[str]:
        """The methods to run (``all``: every registered one this call can feed). A method named
        explicitly whose needs this call does not meet is one line, before any work."""
        from oodbench.benchmark.plan import resolve_postprocessors

        listed, names = "all" not in self.names, []
        for name in resolve_postprocessors(self.names):
            cls = POSTPROCESSORS.get(name)
            lacking = [e for e in cls.needs_extras if not any(e in (m.extras or {}) for m in self.models)]
            if listed and cls.needs_fit and "val" not in self.id_splits:
                raise OodbenchError(f"postprocessor '{name}' is fitted on ID data and needs val= (ID validation "
                                    "images) even when fit= is given: it fits on fit= (else on val=) and reads "
                                    "val= for its validation statistics and search")
            if listed and lacking:
                wanted = ", ".join(f"'{e}': ..." for e in cls.needs_extras)
                raise OodbenchError(f"postprocessor '{name}' needs the model's extras {', '.join(lacking)}; name "
                                    f"them with extras={{{wanted}}} (a layer, an output entry or an attribute set "
                                    "in forward)")
            if not lacking and (not cls.needs_fit or "val" in self.id_splits):
                names.append(name)
        return names

    # ------------------------------------------------------------------ the run

    def __enter__(self) -> "Session":
        stack = self._stack
        if not self.config.results:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="oodbench-"))
            self.config.results = str(Path(folder) / "results.sqlite")
        for model in self.models:
            stack.enter_context(borrowed(model.net))
            model.net.eval()
            self.adapters[model.label] = adapt(model, self.image, self.device)
        self.config.models = stack.enter_context(api_models.registered(
            self.adapters, {m.label: m.tags for m in self.models}))
        self.config.data_root = self.config.cache_dir
        classes = {label: adapter.num_classes for label, adapter in self.adapters.items()}
        self.num_classes = next(iter(classes.values()))
        self._check_labels()
        refs = stack.enter_context(api_data.registered(self._tensors()))
        self.benchmark = Benchmark(
            name=self.benchmark_name, version="python", image=self.image, num_classes=self.num_classes,
            id_splits={s: refs[f"id:{s}"] for s in self.id_splits},
            ood_val={n: refs[f"ood_val:{n}"] for n in self.ood_val},
            near={n: refs[f"ood:{n}"] for n, g in self.groups.items() if g == "near"},
            far={n: refs[f"ood:{n}"] for n, g in self.groups.items() if g == "far"},
            description="in-memory data given to oodbench's Python API", source="python")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        tensors = {f"id:{s}": (split.images, split.labels_for(self.head)) for s, split in self.id_splits.items()}
        for prefix, sets in (("ood", self.ood), ("ood_val", self.ood_val)):  # OOD labels are never read
            tensors.update({f"{prefix}:{n}": (split.images, torch.zeros(len(split), dtype=torch.long))
                            for n, split in sets.items()})
        return tensors

    def _check_labels(self) -> None:
        """ID labels are class indices of the model (or, in the test split, held-out classes)."""
        holdout = torch.tensor(self.holdout, dtype=torch.long)
        for split, what in (("test", "id_test"), ("val", "val"), ("train", "fit")):
            if split not in self.id_splits:
                continue
            labels = self.id_splits[split].labels_for(self.head)
            allowed = (labels >= 0) & ((labels < self.num_classes) | torch.isin(labels, holdout))
            if not bool(allowed.all()):
                bad = sorted(set(labels[~allowed].tolist()))[:5]
                raise OodbenchError(f"{what}: labels {bad} are not classes of the model, whose {self.num_classes} "
                                    f"outputs are classes 0..{self.num_classes - 1} (pseudo-novel test classes go "
                                    "in holdout_classes)")

    def run(self, progress: bool = False):
        """Run the experiment through the harness; returns (and keeps) its leaderboard frame."""
        from oodbench.benchmark.runner import run_experiment

        self.frame = run_experiment(self.config, "local", quiet=not progress, resolved_benchmark=self.benchmark)
        return self.frame

    def experiment(self, extract: Sequence[str] = ()):
        """The finished run read back (`CachedExperiment`), for the tasks (`oodbench.tasks`); the outputs of
        the splits `extract` are computed first when no method of the run read them."""
        from oodbench.benchmark.experiment import CachedExperiment
        from oodbench.benchmark.jobs import split_outputs
        from oodbench.benchmark.plan import Plan, resolve_postprocessors

        plan = Plan.resolve(self.config, self.benchmark, resolve_postprocessors(self.names), every_split=True)
        experiment = CachedExperiment(self.config, self.benchmark, plan)
        for spec in self.config.models:
            for split in extract:
                if split in experiment.splits and not experiment.has(spec, split):
                    split_outputs(experiment.context(spec), experiment.splits[split])
        return experiment
