"""The fitted detector as an object that leaves the harness.

`detector(name, model, fit=..., val=...)` fits a postprocessor on a live model's outputs
exactly as a run does (the same extraction and output cache, `fit_cached` with the
fit-state cache, the validation search when OOD validation data is given) and picks the
threshold tau that keeps a share `keep` of the ID validation images (the classic FPR@95
rule, `threshold_keeping`) or takes a given `tau`. The returned `Detector` scores new
images with the harness's own code path (`extract`, then ``method.score``), so its scores
are the numbers a run computes on the same images, and ``predict`` answers the class, or
-1 ("novel") when the score is below tau.

`Detector.save` writes the postprocessor's name, hyperparameters and fit state, the
threshold and how the model is read (normalisation, output, extras, classifier), but no
weights; `load_detector(path, model)` reads it with ``torch.load(weights_only=True)`` and
refuses (one line) a model whose weights hash differs from the one it was fitted on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from oodbench.version import __version__
from oodbench.api import data as api_data
from oodbench.api import models as api_models
from oodbench.api.models import Model, adapt, as_models, borrowed, model_device
from oodbench.api.reading import image_spec, ood_sets, read_split
from oodbench.storage.caches import FitStateCache
from oodbench.storage.files import atomic_save
from oodbench.benchmark.extraction import extract
from oodbench.benchmark.fitting import fit_cached
from oodbench.benchmark.jobs import RunContext, load_cached_outputs, split_outputs
from oodbench.benchmark.plan import SplitRef, search_space_for
from oodbench.benchmark.search import finite_scores, search_hyperparameters
from oodbench.datasets.base import TensorImages
from oodbench.datasets.transform import ImageSpec, Transformed
from oodbench.errors import OodbenchError
from oodbench.metrics.detection import threshold_keeping
from oodbench.models.adapter import ModelAdapter, ModelContext
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.registry import POSTPROCESSORS

FORMAT = "oodbench.detector"
FORMAT_VERSION = 1


class Detector:
    """A postprocessor fitted for one model, with its threshold tau.

    ``score(images)`` -> float tensor [N], higher = more in-distribution; ``predict(images)``
    -> long tensor [N], the predicted class where score >= tau, else -1 (novel);
    ``threshold``: tau; ``save(path)``. Images: [0,1] tensors N x C x H x W (resized to the
    shape the detector was fitted on, as a benchmark does), a Dataset or a DataLoader.
    The detector reads the live network: train it further and its fit state and tau are
    stale (fit a new one; `load_detector` checks the weights hash).
    """

    def __init__(self, method: Postprocessor, model: Model, adapter: ModelAdapter, image: ImageSpec,
                 threshold: float, rule: str, device: str, batch_size: int = 256):
        self.method, self.model, self.adapter, self.image = method, model, adapter, image
        self.threshold, self.rule, self.device, self.batch_size = float(threshold), rule, device, batch_size

    def __repr__(self) -> str:
        return (f"Detector({self.method!r} on {self.model.label}, threshold={self.threshold:.6g}: {self.rule})")

    def _outputs(self, images: Any) -> Outputs:
        split = read_split(images, "images", labeled=False)
        dataset = Transformed(TensorImages(split.images, torch.zeros(len(split), dtype=torch.long)), self.image,
                              label_override=-1)
        outputs = extract(self.adapter, dataset, self.batch_size, 0, self.device)
        if self.method.needs_model or self.method.needs_layers or self.method.needs_weights:
            outputs.model, outputs.inputs = self.adapter, dataset
            outputs.meta["batch_size"] = self.batch_size
        return outputs

    def _scored(self, images: Any) -> tuple[torch.Tensor, Outputs]:
        with borrowed(self.model.net):
            self.adapter.eval().to(self.device)
            for parameter in self.model.net.parameters():
                parameter.requires_grad_(False)
            outputs = self._outputs(images)
            scores = torch.as_tensor(self.method.score(outputs)).detach().cpu()
        finite_scores(scores, "these images", len(outputs))
        return scores, outputs

    def score(self, images: Any) -> torch.Tensor:
        """One score per image, higher = more in-distribution (the harness's numbers)."""
        return self._scored(images)[0]

    def predict(self, images: Any) -> torch.Tensor:
        """The predicted class of each image, or -1 where its score is below the threshold."""
        scores, outputs = self._scored(images)
        return torch.where(scores.double() >= self.threshold, outputs.predictions, torch.full_like(outputs.predictions, -1))

    def save(self, path: str | Path) -> Path:
        """Write the fit state, hyperparameters, threshold and how to read the model (no weights)."""
        state = self.method.fit_state()
        for key, value in state.items():
            if not _plain(value):
                raise OodbenchError(f"cannot save the '{self.method.name}' detector: its fit state '{key}' is a "
                                    f"{type(value).__name__}, not tensors and plain values")
        reading = {"normalization": _plain_or_none(self.model.normalization),
                   "output": self.model.output if _plain(self.model.output) else None,
                   "extras": {k: v for k, v in (self.model.extras or {}).items() if isinstance(v, str)},
                   "classifier": api_models._layer_name(self.model.net, self.adapter.classifier),
                   "outputs_probabilities": self.model.outputs_probabilities}
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "oodbench_version": __version__,
                   "postprocessor": self.method.name, "params": dict(self.method.params), "fit_state": state,
                   "threshold": self.threshold, "rule": self.rule, "batch_size": self.batch_size,
                   "image": [self.image.size, self.image.channels], "num_classes": self.adapter.num_classes,
                   "weights_hash": self.adapter.weights_hash, "name": self.model.label, "reading": reading,
                   "unsaved": [k for k in ("output", "extras") if self._unsaved(k, reading)]}
        path = Path(path).expanduser()
        atomic_save(payload, path)
        return path

    def _unsaved(self, key: str, reading: dict) -> bool:
        given = getattr(self.model, key)
        return bool(given) and reading[key] != (dict(given) if isinstance(given, Mapping) else given)


def _plain(value: Any) -> bool:
    """Tensors and JSON-like values: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, (torch.Tensor, bool, int, float, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _plain_or_none(normalization: Any) -> Any:
    if normalization is None:
        return None
    return [[float(v) for v in torch.as_tensor(part).flatten()] for part in normalization]


def detector(name: str, model: nn.Module | Model, *, fit: Any = None, val: Any = None, keep: float = 0.95,
             tau: float | None = None, params: Mapping[str, Any] | None = None, ood_val: Any = None,
             cache_dir: str | None = None, device: str | None = None, batch_size: int = 256,
             normalization: Any = None, output: Any = None, extras: Mapping[str, Any] | None = None,
             classifier: Any = None, outputs_probabilities: bool = False) -> Detector:
    """Fit the postprocessor `name` for `model` and choose its threshold.

    `val`: ID validation data (images and labels; see `oodbench.api.reading` for the forms),
    required unless `tau` is given and the method needs no fit; tau keeps a share `keep`
    (default 0.95) of its scores. `fit`: ID training data for methods that fit (default:
    `val`). `ood_val`: OOD validation data (or ``{name: data}``): the hyperparameters are
    then searched on it as in a run (best validation AUROC), else `params` or the defaults
    are used. Outputs go through the output cache under `cache_dir` (default
    ``OODBENCH_CACHE`` or ``.oodbench_cache``). Reading options as in `oodbench.evaluate`.
    Raises `OodbenchError` in one line for bad input.
    """
    from oodbench.api.session import default_cache_dir

    models = as_models(model, normalization=normalization, output=output, extras=extras, classifier=classifier,
                       outputs_probabilities=outputs_probabilities)
    if len(models) != 1:
        raise OodbenchError(f"a detector is made for one model, got {len(models)}")
    spec, cls = models[0], POSTPROCESSORS.get(name)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise OodbenchError(f"keep must be a share in (0, 1], got {keep!r}")
    if val is None and (cls.needs_fit or tau is None):
        why = "it is fitted on them and " if cls.needs_fit else ""
        raise OodbenchError(f"detector '{name}': pass val= (ID validation images and labels): {why}the threshold "
                            f"keeps {keep:.0%} of their scores" + ("" if cls.needs_fit else " (or give tau=)"))
    if val is None and fit is None:
        raise OodbenchError(f"detector '{name}': pass val= or fit= (ID images and labels): they set the image shape")
    splits = {"id:val": read_split(val, "val", True)} if val is not None else {}
    if fit is not None:
        splits["id:fit"] = read_split(fit, "fit", True)
    for set_name, data in ood_sets(ood_val, "ood_val").items():
        splits[f"ood_val:{set_name}"] = read_split(data, f"ood_val['{set_name}']", False)
    image = image_spec(splits["id:val"] if "id:val" in splits else splits["id:fit"], "val")
    device = model_device(spec.net, device)
    cache = Path(cache_dir or default_cache_dir())
    with borrowed(spec.net):
        spec.net.eval()
        adapter = adapt(spec, image, device)
        tensors = {s: (split.images, split.labels_for(None) if not s.startswith("ood_val") else
                       torch.zeros(len(split), dtype=torch.long)) for s, split in splits.items()}
        with api_models.registered({spec.label: adapter}) as (model_spec,), api_data.registered(tensors) as refs:
            context = RunContext(model_spec, ModelContext(cache, cache, device), image, str(cache), batch_size, 0)
            method, rule, threshold = _fit(cls, params or {}, context, refs, adapter, keep, tau)
    return Detector(method, spec, adapter, image, threshold, rule, device, batch_size)


def _fit(cls, params, context, refs, adapter, keep, tau):
    """(fitted method, threshold rule, threshold) on the registered splits, as a run fits."""
    outputs, keys = {}, {}
    for split, ref in refs.items():
        split_ref = SplitRef(split, ref, ood=split.startswith("ood_val"))
        outputs[split], keys[split] = split_outputs(context, split_ref)
        if cls.needs_model or cls.needs_layers or cls.needs_weights:
            outputs[split] = load_cached_outputs(context, split_ref, keys[split], adapter)
    fit_split = "id:fit" if "id:fit" in outputs else "id:val"
    fit_keys = [keys.get(fit_split), keys.get("id:val")]
    fit_cache = FitStateCache(context.model_context.cache_dir)

    def fit(method):
        fit_cached(method, outputs.get(fit_split), outputs.get("id:val"), fit_cache, fit_keys)

    chosen = dict(params)
    ood_val = [o for s, o in outputs.items() if s.startswith("ood_val")]
    space = {k: v for k, v in search_space_for(cls.name, cls).items() if k not in params}
    if ood_val and space and "id:val" in outputs:
        chosen, _ = search_hyperparameters(cls, params, space, outputs["id:val"], ood_val, fit)
    method = cls(**chosen)
    fit(method)
    if tau is not None:
        return method, f"tau = {tau:g} (given)", float(tau)
    val_scores = finite_scores(method.score(outputs["id:val"]), "ID val", len(outputs["id:val"]))
    return method, f"keeps {keep:.0%} of ID validation", threshold_keeping(val_scores, keep)


def load_detector(path: str | Path, model: nn.Module, *, device: str | None = None, check_weights: bool = True,
                  output: Any = None, extras: Mapping[str, Any] | None = None) -> Detector:
    """A detector saved with `Detector.save`, for `model` (the same weights; `check_weights`
    refuses others in one line). `output`/`extras`: callables the file could not hold."""
    path = Path(path).expanduser()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OodbenchError(f"detector file not found: {path}") from None
    except Exception as exc:
        raise OodbenchError(f"{path} is not a saved oodbench detector ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OodbenchError(f"{path} is not a saved oodbench detector")
    if payload["version"] > FORMAT_VERSION:
        raise OodbenchError(f"{path} was saved by a newer oodbench (detector format {payload['version']})")
    missing = [k for k in payload["unsaved"] if not {"output": output, "extras": extras}[k]]
    if missing:
        raise OodbenchError(f"{path}: the detector read the model with a callable {' and '.join(missing)}, which a "
                            f"file cannot hold; pass {', '.join(f'{k}=' for k in missing)} again")
    reading = payload["reading"]
    spec = Model(model, name=payload["name"], normalization=reading["normalization"],
                 output=output if output is not None else reading["output"],
                 extras={**reading["extras"], **(extras or {})}, classifier=reading["classifier"],
                 outputs_probabilities=reading["outputs_probabilities"])
    size, channels = payload["image"]
    image = ImageSpec(size, channels)
    device = model_device(model, device)
    with borrowed(model):
        model.eval()
        adapter = adapt(spec, image, device)
    if check_weights and adapter.weights_hash != payload["weights_hash"]:
        raise OodbenchError(f"{path}: this model's weights (hash {adapter.weights_hash}) are not the ones the detector "
                            f"was fitted on ({payload['weights_hash']}); load those weights, or pass check_weights=False")
    method = POSTPROCESSORS.get(payload["postprocessor"])(**payload["params"])
    method.load_fit_state(payload["fit_state"])
    return Detector(method, spec, adapter, image, payload["threshold"], payload["rule"], device,
                    payload["batch_size"])
