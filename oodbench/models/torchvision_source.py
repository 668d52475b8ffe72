"""torchvision's ImageNet classifiers with weights from a local file, as
``torchvision:<architecture>`` (``resnet50``, ``wide_resnet50_2``, ``vit_b_16``...; the
names of ``torchvision.models.list_models()``).

The weights come from ``checkpoint`` (a state dict: torchvision's own file, or a retrained
network of the same architecture such as PixMix's or AugMix's ResNet-50, plain or under
``state_dict``, ``module.`` prefixes removed), or, with ``weights`` and no checkpoint, from
the file torchvision itself would have saved, ``<torch hub dir>/checkpoints/<file name of
the entry's URL>`` (``TORCH_HOME``); nothing is downloaded.

The weights entry (``ResNet50_Weights.IMAGENET1K_V2``...) is the ``weights`` option, or the
entry whose URL ends in the checkpoint's file name (``resnet50-11ad3fa6.pth`` is
IMAGENET1K_V2). Its published transforms (``weights.transforms()``, read from the enum:
resize the short side to ``resize_size`` with its interpolation, center-crop
``crop_size``, normalise with its mean/std) are the model's test transform
(``preprocessing: model``, the default; ``benchmark`` keeps the benchmark's). A file that
is no entry's gets ImageNet's mean/std and the benchmark's transform, and the caption says so.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import (ModelAdapter, ModelContext, check_preprocessing_choice, own_preprocessing,
                                     register_model_source)
from oodbench.models.checkpoints import checkpoint_path, extract_state_dict, load_weights, read_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def weights_entries(arch: str) -> list[Any]:
    """The ImageNet weights entries torchvision publishes for `arch` (may be empty)."""
    models = importlib.import_module("torchvision.models")
    try:
        return list(models.get_model_weights(arch))
    except (ValueError, KeyError):
        return []


def entry_file(entry: Any) -> Path:
    """Where torchvision saves the weights of `entry`: <hub dir>/checkpoints/<URL's file name>."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / entry.url.rsplit("/", 1)[-1]


def find_entry(arch: str, weights: str | None, path: Path | None) -> Any:
    """The weights entry named by `weights`, or the one whose file `path` is (None if none)."""
    entries = weights_entries(arch)
    if weights is not None:
        names = [entry.name for entry in entries]
        if weights not in names:
            raise OodbenchError(f"torchvision:{arch}: no weights entry '{weights}'{did_you_mean(weights, names)}; "
                                f"its entries: {', '.join(names) or 'none'}")
        return entries[names.index(weights)]
    return next((entry for entry in entries if path is not None and entry.url.endswith("/" + path.name)), None)


def entry_transform(arch: str, entry: Any) -> tuple[dict[str, Any], tuple, tuple]:
    """(test transform, mean, std) of a weights entry's published transforms."""
    transforms = entry.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    interpolation = getattr(transforms.interpolation, "value", str(transforms.interpolation))
    origin = f"torchvision {type(entry).__name__}.{entry.name}"
    return own_preprocessing(crop, resize, interpolation, origin), tuple(transforms.mean), tuple(transforms.std)


@register_model_source("torchvision")
def torchvision_model(name: str, context: ModelContext, checkpoint: str | None = None, weights: str | None = None,
                      num_classes: int | None = None, preprocessing: str | None = None) -> ModelAdapter:
    """torchvision ImageNet architectures + a local weights file (checkpoint, or weights: ENTRY in torch's cache)."""
    own = check_preprocessing_choice(preprocessing, f"torchvision:{name}")
    models = importlib.import_module("torchvision.models")
    architectures = models.list_models(module=models)
    if name not in architectures:
        raise OodbenchError(f"unknown torchvision classifier '{name}'{did_you_mean(name, architectures)}")
    if checkpoint is None and weights is None:
        raise OodbenchError(f"torchvision:{name} needs weights: set 'checkpoint' to a local file, or 'weights' to an "
                            f"entry ({', '.join(e.name for e in weights_entries(name)) or 'none'}) whose file is in "
                            "torch's hub cache")
    entry = find_entry(name, weights, Path(checkpoint) if checkpoint else None)
    if checkpoint is None:
        path = entry_file(entry)
        if not path.is_file():
            raise OodbenchError(f"torchvision:{name} {entry.name}: weights file not found: {path} (oodbench never "
                                "downloads; copy torchvision's file there or set 'checkpoint')")
    else:
        path = checkpoint_path(checkpoint, f"torchvision:{name}")
    state = extract_state_dict(read_state_dict(path, trust=context.trust_checkpoint), path)
    classes = num_classes or (len(entry.meta["categories"]) if entry is not None else 1000)
    net = models.get_model(name, weights=None, num_classes=classes)
    load_weights(net, state, path, f"torchvision:{name} ({classes} classes)")
    if entry is not None:
        transform, mean, std = entry_transform(name, entry)
    else:
        transform, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
    return ModelAdapter(net, num_classes=classes, mean=mean, std=std,
                        identity=f"torchvision:{name}:{classes}:{entry.name if entry is not None else 'file'}",
                        preprocessing=transform if own is not False else None)
