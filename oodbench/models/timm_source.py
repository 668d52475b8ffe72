"""Any timm architecture (Wightman, "PyTorch Image Models") with weights from a local file
or the local Hugging Face cache, as ``timm:<model name>`` (``resnet50.a1_in1k``: the
architecture and its pretrained tag).

Weights, never downloaded:
- ``checkpoint``: a local file (a state dict, plain or under ``state_dict`` / ``model``...;
  ``.safetensors`` too), loaded strictly into ``timm.create_model(name, pretrained=False,
  num_classes=..., **model_kwargs)``;
- ``pretrained: true``: the weights file the Hugging Face hub cache already holds for the
  tag (``<cache>/models--timm--<name>/snapshots/<revision>/model.safetensors``, or
  ``pytorch_model.bin``; ``cache_dir`` defaults to the hub's, ``HF_HUB_CACHE``), found with
  ``huggingface_hub.try_to_load_from_cache`` (a lookup on disk, no request) and handed to
  timm's own pretrained loading as a state dict, so timm's checkpoint filters apply. A
  weights file absent from the cache is one line naming where it was expected.

The class count, when not given, is the checkpoint's classifier's (``pretrained_cfg["classifier"]``)
or the tag's. The normalisation is the tag's mean/std (``mean``/``std`` override them).
The test transform is the model's own (``preprocessing: model``) by default when the
network has the tag's class count (weights of the data timm's config describes, such as
ImageNet's 1,000 classes): timm's data config (``timm.data.resolve_data_config``) gives
the input size, the interpolation and ``crop_pct``, so images are resized (short side) to
``floor(size / crop_pct)`` and center-cropped to ``size``, as timm's eval transform does.
Otherwise (a CIFAR checkpoint of a timm architecture), and with ``preprocessing:
benchmark``, the benchmark's transform applies. Features are the input of
``get_classifier()``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import (ModelAdapter, ModelContext, check_preprocessing_choice, own_preprocessing,
                                     register_model_source)
from oodbench.models.checkpoints import checkpoint_path, extract_state_dict, load_weights, read_state_dict

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub weights are named, in its order


def _num_classes_in(state: dict, classifier: str | None) -> int | None:
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 2 else None


def hub_cache_dir(cache_dir: str | None = None) -> Path:
    """The Hugging Face hub cache folder: `cache_dir`, else the hub's own (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_weights(name: str, cache_dir: str | None = None) -> tuple[Path | None, str]:
    """(the cached weights file of timm model `name`, or None; where it is expected), from the
    local hub cache only."""
    timm = importlib.import_module("timm")
    config = timm.models.get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        return None, f"no Hugging Face weights are known for timm:{name}"
    from huggingface_hub import try_to_load_from_cache

    folder = hub_cache_dir(cache_dir)
    repo = config.hf_hub_id
    files = (config.hf_hub_filename,) if config.hf_hub_filename else HUB_FILES
    for filename in files:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(folder))
        if isinstance(found, str):
            return Path(found), found
    expected = folder / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / files[0]
    return None, str(expected)


def data_transform(net: nn.Module, name: str) -> tuple[dict[str, Any], Sequence[float], Sequence[float]]:
    """(the model's test transform, mean, std) from timm's data config of `net`."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=net)
    _, height, width = config["input_size"]
    if height != width or config.get("crop_mode", "center") != "center":
        raise OodbenchError(f"timm:{name}: its data config ({height}x{width}, crop_mode {config.get('crop_mode')}) "
                            "is not a square center crop; set preprocessing: benchmark to use the benchmark's")
    resize = math.floor(height / config["crop_pct"])  # timm's transforms_imagenet_eval
    transform = own_preprocessing(height, max(resize, height), config["interpolation"],
                                  f"timm data config of {name}: crop_pct {config['crop_pct']}")
    return transform, tuple(config["mean"]), tuple(config["std"])


@register_model_source("timm")
def timm_model(name: str, context: ModelContext, checkpoint: str | None = None, num_classes: int | None = None,
               pretrained: bool = False, cache_dir: str | None = None, model_kwargs: dict[str, Any] | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               preprocessing: str | None = None) -> ModelAdapter:
    """Any timm architecture + a local checkpoint or the local Hugging Face cache (pretrained: true); no downloads."""
    timm = importlib.import_module("timm")
    own = check_preprocessing_choice(preprocessing, f"timm:{name}")
    if not timm.is_model(name):
        raise OodbenchError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}")
    if (mean is None) != (std is None):
        raise OodbenchError(f"timm:{name}: give both 'mean' and 'std' (or neither)")
    kwargs = dict(model_kwargs or {})
    if checkpoint is not None:
        path = checkpoint_path(checkpoint, f"timm:{name}")
        state = extract_state_dict(read_state_dict(path, trust=context.trust_checkpoint), path)
        config = timm.models.get_pretrained_cfg(name)
        num_classes = num_classes or _num_classes_in(state, config.classifier if config is not None else None)
        kwargs.update({"num_classes": num_classes} if num_classes else {})
        net = _create(timm, name, kwargs, pretrained=False)
        load_weights(net, state, path, f"timm:{name}")
    elif pretrained:
        path, expected = hub_weights(name, cache_dir)
        if path is None:
            raise OodbenchError(f"timm:{name}: weights not in the local Hugging Face cache: {expected} (oodbench never "
                                "downloads; fetch them where there is network, e.g. timm.create_model(name, "
                                "pretrained=True), and copy the cache, or set 'checkpoint' to a local file)")
        state = extract_state_dict(read_state_dict(path, trust=context.trust_checkpoint), path)
        tagged = timm.models.get_pretrained_cfg(name).num_classes
        if num_classes not in (None, tagged):  # timm would drop the classifier and leave it random
            raise OodbenchError(f"timm:{name}: the cached weights have {tagged} classes, not num_classes "
                                f"{num_classes}; use a checkpoint of the {num_classes}-class model")
        # timm's own loading from a state dict (its checkpoint filters, class-count handling), no hub request
        net = _create(timm, name, kwargs, pretrained=True, pretrained_cfg_overlay={"state_dict": state, "source": ""})
    else:
        raise OodbenchError(f"timm:{name} needs weights: set 'checkpoint' to a local file, or pretrained: true to "
                            "read them from the local Hugging Face cache (random weights are not a model to benchmark)")
    tag_config = timm.models.get_pretrained_cfg(name)
    own = own if own is not None else tag_config is not None and net.num_classes == tag_config.num_classes
    transform, own_mean, own_std = data_transform(net, name) if own else (None, *_config_normalisation(net))
    mean, std = (mean, std) if mean is not None else (own_mean, own_std)
    head = net.get_classifier()
    classifier = head if isinstance(head, (nn.Linear, nn.Conv2d)) else None
    return ModelAdapter(net, num_classes=net.num_classes, classifier=classifier,
                        identity=f"timm:{name}:{net.num_classes}:{sorted(kwargs.items())}:mean={mean}:std={std}",
                        mean=mean, std=std, preprocessing=transform if own else None)


def _config_normalisation(net: nn.Module) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    config = getattr(net, "pretrained_cfg", {}) or {}
    return config.get("mean"), config.get("std")


def _create(timm: Any, name: str, kwargs: dict[str, Any], **options: Any) -> nn.Module:
    try:
        return timm.create_model(name, **options, **kwargs)
    except TypeError as exc:
        raise OodbenchError(f"timm:{name}: bad model_kwargs {kwargs}: {exc}") from None
    except RuntimeError as exc:  # with pretrained: timm's strict load of the cached weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "the cached weights do not fit the architecture" if options.get("pretrained") else "cannot build it"
        raise OodbenchError(f"timm:{name}: {what} ({first})") from None
