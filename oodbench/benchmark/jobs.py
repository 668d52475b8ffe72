"""The runner's jobs, each small and picklable so that any executor (local, Ray) can run it.

1. `ProbeJob` per model: load it once, report its identity, weights hash, class count and
   its own test transform when it has one, and run one image of the shape it will see
   through it (the runner refuses a model that does not fit the benchmark before any
   extraction; its context then carries the model's transform);
2. `ExtractJob` per (model, dataset split): one forward pass whose logits, features and
   labels go to the output cache (reused when the entry exists and verifies);
3. `ScoreJob` per (model, postprocessor) cell not already in the store: fit on cached ID
   outputs, search hyperparameters on the validation split, score the test splits and
   return a `Cell`; only methods that need input gradients load the model again, and
   their cells draw their own bar (images/s, ETA) under the run's grid bar.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from oodbench.storage.caches import FitStateCache, OutputCache
from oodbench.benchmark.extraction import extract
from oodbench.benchmark.fitting import fit_cached
from oodbench.benchmark.config import ExperimentConfig
from oodbench.benchmark.plan import SplitRef, split_state
from oodbench.benchmark.reads import attach, ensure_statistics
from oodbench.benchmark.search import (NonFiniteScores, ScoreShapeError, finite_scores, limit_validation,
                                      limited_sizes, search_hyperparameters, split_grid)
from oodbench.benchmark.conventions import load_conventions
from oodbench.datasets.base import load_dataset
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, NoSpaceLeft, OodbenchError, debugging, failure_line
from oodbench.metrics.detection import accuracy, ood_metrics
from oodbench.identity import output_key_text
from oodbench.file_state import FileState
from oodbench.models.adapter import ModelContext, ModelSpec, load_model
from oodbench.postprocessors.base import Outputs, Postprocessor, grid
from oodbench.registry import POSTPROCESSORS, load_plugins
from oodbench.storage.store import Cell

ID_TEST = "id_test"
FS = "fs_"  # prefix of the full-spectrum metrics: ID test + covariate-shifted sets as ID (OpenOOD v1.5 fsood)

_MODELS: dict[tuple, Any] = {}


def get_model(spec: ModelSpec, context: ModelContext):
    """The adapter for `spec`, built once per process."""
    key = (spec.name, spec.checkpoint, json.dumps(spec.options, sort_keys=True, default=str),
           str(context.cache_dir), context.device)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, context)
    return _MODELS[key]


@dataclass
class RunContext:
    """Everything a job needs besides its own fields; small and picklable. `token` names the
    run, so that jobs in one process reuse its listing of each dataset."""

    model: ModelSpec
    model_context: ModelContext
    image: ImageSpec
    data_root: str
    batch_size: int
    num_workers: int
    token: str | None = None
    progress: bool = False  # input-gradient cells draw a bar of their own

    @classmethod
    def of(cls, config: ExperimentConfig, spec: ModelSpec, image: ImageSpec, device: str,
           token: str | None = None, progress: bool = False) -> "RunContext":
        model_context = ModelContext(Path(config.cache_dir), Path(config.data_root), device,
                                     trust_checkpoint=config.trust_checkpoint)
        return cls(spec, model_context, image, config.data_root, config.batch_size, config.num_workers, token,
                   progress)


def task_resources(device: str, runs_model: bool = True) -> dict[str, int]:
    """What one job asks of an executor: a GPU when it runs the model on CUDA, else one CPU."""
    return {"num_cpus": 1, "num_gpus": 1} if runs_model and device.startswith("cuda") else {"num_cpus": 1}


def nonfinite_count(tensor: torch.Tensor, rows: int = 4096) -> int:
    """NaN and infinite values, counted a block of rows at a time (a mapped entry stays unread into memory)."""
    return sum(int((~torch.isfinite(block)).sum()) for block in tensor.split(rows))


@dataclass
class ProbeJob:
    context: RunContext

    @property
    def label(self) -> str:
        return f"{self.context.model.display} load"

    @property
    def resources(self) -> dict[str, int]:
        return task_resources(self.context.model_context.device)

    def run(self) -> dict[str, Any]:
        """Identity, weights hash, class count, its own test transform (or None: the benchmark's),
        and the error of a one-image forward at the size it will see (or None)."""
        ctx = self.context
        model = get_model(ctx.model, ctx.model_context)
        spec = ctx.image.for_model(model.preprocessing)
        image = torch.rand(1, spec.channels, spec.size, spec.size, device=ctx.model_context.device)
        try:
            with torch.no_grad():
                logits = model(image)
            forward = None if logits.ndim == 2 else f"its output has shape {list(logits.shape)}, not [1, classes]"
            classes = int(logits.shape[-1])
        except Exception as exc:  # any error of the user's network on this shape is the answer
            forward, classes = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
        return {"identity": model.identity, "weights_hash": model.weights_hash, "num_classes": model.num_classes,
                "output_classes": classes, "forward_error": forward, "preprocessing": model.preprocessing}


@dataclass
class ExtractJob:
    context: RunContext
    split: SplitRef
    key: str  # the output-cache key of (model, split)
    statistics: tuple = ()  # layer statistics the pending cells read (`oodbench.benchmark.reads`)

    @property
    def label(self) -> str:
        return f"{self.context.model.display} {self.split.name}"

    @property
    def resources(self) -> dict[str, int]:
        return task_resources(self.context.model_context.device)

    def run(self) -> dict[str, Any]:
        """Ensure the cache entry exists; report its size, ID accuracy and seconds."""
        start = time.time()
        ctx = self.context
        cache = OutputCache(ctx.model_context.cache_dir)
        outputs = cache.load(self.key)
        if outputs is None:
            model = get_model(ctx.model, ctx.model_context)
            dataset = load_dataset(self.split.ref, ctx.data_root, ctx.image, ood=self.split.ood, memo=ctx.token)
            outputs = extract(model, dataset, ctx.batch_size, ctx.num_workers, ctx.model_context.device,
                              desc=self.label, cache=cache, key=self.key)
        if self.statistics:
            dataset = load_dataset(self.split.ref, ctx.data_root, ctx.image, ood=self.split.ood, memo=ctx.token)
            ensure_statistics(get_model(ctx.model, ctx.model_context), dataset, self.key, self.statistics,
                              ctx.model_context.cache_dir, ctx.batch_size, ctx.num_workers, ctx.model_context.device)
        result = {"split": self.split.name, "samples": len(outputs), "accuracy": None, "reason": None}
        bad = nonfinite_count(outputs.logits)
        if bad:
            result["reason"] = f"{bad} of {outputs.logits.numel()} logits are NaN or infinite"
        elif not self.split.ood:
            result["accuracy"] = accuracy(outputs.logits.numpy(), outputs.labels.numpy())
        result["seconds"] = time.time() - start
        return result


def load_cached_outputs(context: RunContext, split: SplitRef, key: str, model=None) -> Outputs:
    """Cached outputs of one split; with `model`, also the model and the split's images
    (for methods that run the model again)."""
    outputs = OutputCache(context.model_context.cache_dir).load(key)
    if outputs is None:
        raise OodbenchError(f"cached outputs for {split.name} are missing; rerun `oodbench run` to compute them")
    if model is not None:
        outputs.model = model
        outputs.inputs = load_dataset(split.ref, context.data_root, context.image, ood=split.ood,
                                      memo=context.token)
        outputs.meta["batch_size"] = context.batch_size
        outputs.meta["num_workers"] = context.num_workers
    return outputs


def split_outputs(context: RunContext, split: SplitRef) -> tuple[Outputs, str]:
    """The outputs of the context's model on one split and their cache key: fingerprinted,
    read from the output cache, or extracted when absent (for scripts and tests)."""
    files = FileState(context.data_root, Path(context.model_context.cache_dir) / "state")
    state = split_state(split, context.data_root, context.image, files, context.token)
    files.close()
    if not state.present:
        raise DatasetMissing(state.reason)
    model = get_model(context.model, context.model_context)
    key = output_key_text(model.identity, model.weights_hash, state.fingerprint)
    ExtractJob(context, split, key).run()
    return load_cached_outputs(context, split, key), key


@dataclass
class ScoreJob:
    context: RunContext
    postprocessor: str
    params: dict[str, Any]
    space: dict[str, list[Any]]
    splits: dict[str, SplitRef]  # id:test, id:val, id:fit, ood_val:*, and every OOD test set
    keys: dict[str, str]  # split name -> output-cache key (present splits only)
    groups: dict[str, str]  # test set name -> csid | near | far (csid: covariate-shifted ID)
    cell_base: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    search_limit: int | None = None  # input-gradient searches: validation images per side
    conventions: str = "paper"  # the profile: the AUPR rule and the search's order (`oodbench.benchmark.conventions`)
    statistics: tuple = ()  # the method's layer statistics, read from the layer cache
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> other checkpoint -> output key

    @property
    def label(self) -> str:
        return f"{self.context.model.display} {self.postprocessor}"

    @property
    def resources(self) -> dict[str, int]:
        """Output-based methods read the cache on a CPU; input-gradient ones run the model."""
        needs_model = POSTPROCESSORS.get(self.postprocessor).needs_model
        return task_resources(self.context.model_context.device, runs_model=needs_model)

    def _outputs(self, split: str, model=None, progress=None) -> Outputs:
        outputs = load_cached_outputs(self.context, self.splits[split], self.keys[split], model)
        attach(outputs, self.context.model_context.cache_dir, self.keys[split], self.statistics,
               self.members.get(split, {}))
        if progress is not None:
            outputs.meta["progress"] = progress.update
        return outputs

    def _progress(self, cls: type[Postprocessor], searched: bool) -> tqdm:
        """The bar of an input-gradient cell: every image its passes will run through the model
        (each search pass over the capped validation splits, then the test splits)."""
        size = lambda split: len(load_dataset(self.splits[split].ref, self.context.data_root,  # noqa: E731
                                              self.context.image, ood=self.splits[split].ood, memo=self.context.token))
        tests = ["id:test", *(f"{group}:{name}" for name, group in self.groups.items())]
        total = sum(size(s) for s in tests if s in self.keys)
        if searched:
            ood_val = [size(s) for s in self.keys if s.startswith("ood_val:")]
            if self.search_limit is not None:
                ood_val = limited_sizes(ood_val, self.search_limit)
            val = size("id:val") if self.search_limit is None else min(size("id:val"), self.search_limit)
            total += len(list(grid(split_grid(cls, self.space)[0]))) * (val + sum(ood_val))
        return tqdm(total=total, desc=self.label, unit="img", leave=False, mininterval=1.0,
                    disable=not self.context.progress)

    def run(self) -> Cell:
        start = time.time()
        cell = Cell(**self.cell_base)
        try:
            self._score(cell)
        except NonFiniteScores as exc:
            cell.status, cell.reason, cell.metrics = "failed", str(exc), {}
        except ScoreShapeError as exc:
            raise ScoreShapeError(f"postprocessor '{self.postprocessor}': {exc}") from None
        except DatasetMissing as exc:
            cell.status, cell.reason, cell.metrics = "missing", str(exc), {}
        except NoSpaceLeft:  # the machine's, not the method's: the run stops, a rerun resumes
            raise
        except Exception as exc:  # a method's own failure marks its cell, the grid goes on
            if debugging():
                traceback.print_exc()
            cell.status, cell.reason, cell.metrics = "failed", failure_line(exc), {}
        cell.seconds = time.time() - start
        return cell

    def _score(self, cell: Cell) -> None:
        load_plugins(self.plugins, strict=False)
        cls = POSTPROCESSORS.get(self.postprocessor)
        reads_model = cls.needs_model or cls.needs_weights
        model = get_model(self.context.model, self.context.model_context) if reads_model else None
        runs = model if cls.needs_model else None  # needs_weights alone: the parameters are read, no image runs
        searched = bool(self.space) and "id:val" in self.keys and any(s.startswith("ood_val:") for s in self.keys)

        def load(split: str) -> Outputs:
            outputs = self._outputs(split, runs, progress)
            if cls.needs_weights:
                outputs.model = model
            return outputs

        with self._progress(cls, searched) if runs is not None else nullcontext() as progress:
            self._score_with(cell, cls, runs, load)

    def _score_with(self, cell: Cell, cls: type[Postprocessor], model, load) -> None:
        if cls.needs_fit and "id:fit" not in self.keys:
            raise DatasetMissing("the fit split is missing; set fit_split: val to fit on ID validation")
        fit_outputs = functools.cache(lambda: load("id:fit"))  # read only by a fit the cache does not hold
        val_outputs = load("id:val") if "id:val" in self.keys else None
        if cls.needs_fit and val_outputs is None:
            raise DatasetMissing("the ID validation split is missing")

        ood_val_names = [s for s in self.keys if s.startswith("ood_val:")]
        fit_cache = FitStateCache(self.context.model_context.cache_dir)
        fit_keys = [self.keys["id:fit"], self.keys["id:val"]] if cls.needs_fit else []
        fit = lambda method: fit_cached(method, fit_outputs, val_outputs, fit_cache, fit_keys)  # noqa: E731
        chosen = dict(self.params)
        if self.space and val_outputs is not None and ood_val_names:
            ood_val = [load(s) for s in ood_val_names]
            search_val = val_outputs
            if self.search_limit is not None:
                search_val, ood_val = limit_validation(val_outputs, ood_val, self.search_limit)
                cell.search_limit = self.search_limit
            chosen, note = search_hyperparameters(cls, self.params, self.space, search_val, ood_val, fit,
                                                  load_conventions(self.conventions).combinations)
            if note:
                cell.reason = note
                warnings.warn(f"{self.label}: {note}", stacklevel=2)
        method = cls(**chosen)
        cell.params = dict(method.params)
        fit(method)
        test = load("id:test")
        bad = nonfinite_count(test.logits)
        if bad:
            raise NonFiniteScores(f"{bad} of {test.logits.numel()} ID test logits are NaN or infinite; "
                                  "accuracy and scores are not computed")
        id_scores = finite_scores(method.score(test), "ID test", len(test))
        cell.metrics[ID_TEST] = {"acc": accuracy(test.logits.numpy(), test.labels.numpy())}
        cell.scores[ID_TEST] = id_scores
        cell.groups[ID_TEST] = "id"
        shifted = [id_scores]  # ID test + each covariate-shifted set: the ID side of FS-OOD
        hits = [correct_predictions(test)]
        for name, group in sorted(self.groups.items(), key=lambda item: item[1] != "csid"):  # csid sets first
            split = f"{group}:{name}"
            if split not in self.keys:
                continue
            outputs = load(split)
            scores = finite_scores(method.score(outputs), name, len(outputs))
            cell.scores[name], cell.groups[name] = scores, group
            if group == "csid":
                hits.append(correct_predictions(outputs))
                cell.metrics[name] = {"acc": float(hits[-1].mean())}
                shifted.append(scores)
                continue
            aupr = load_conventions(self.conventions).aupr
            cell.metrics[name] = ood_metrics(id_scores, scores, aupr)
            if len(shifted) > 1:
                cell.metrics[name].update({f"{FS}{metric}": value for metric, value
                                           in ood_metrics(np.concatenate(shifted), scores, aupr).items()})
        if len(shifted) > 1:  # OpenOOD's csid_acc: over the ID test and every shifted image together
            cell.metrics[ID_TEST][f"{FS}acc"] = float(np.concatenate(hits).mean())


def correct_predictions(outputs: Outputs) -> np.ndarray:
    """Per sample: whether the argmax of its logits is its label."""
    return outputs.logits.numpy().argmax(axis=1) == outputs.labels.numpy()
