"""RobustBench models (Croce et al., "RobustBench: a standardized adversarial robustness
benchmark", NeurIPS 2021 Datasets and Benchmarks), as ``robustbench:<model name>`` with
the options ``dataset`` (cifar10, cifar100, imagenet), ``threat_model`` (Linf, L2,
corruptions) and ``model_dir``.

Loading is RobustBench's own ``robustbench.utils.load_model``, offline: the weights must
already be in its layout, ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` (ensembles:
``<name>.pt_m0.pt``, ``<name>.pt_m1.pt``...); a missing file is an error naming the
expected path rather than a download. RobustBench 1.1.1 imports ``autoattack``, which its
dependency installs as ``pyautoattack``: the module is aliased before the import.

RobustBench models normalise inside and take [0,1] images, so the adapter adds no
normalisation. ImageNet entries name their test transform (``preprocessing``:
``Res256Crop224`` resize 256 bilinear + center crop 224, ``BicubicRes256Crop224``,
``Res224``...): it is the model's own (`oodbench.datasets.transform.ImageSpec`), so the
corruptions models of the PRO paper's Figure 5 (``Hendrycks2020AugMix``,
``Hendrycks2020Many``, ``Erichson2022NoisyMix``, ``Geirhos2018_SIN``, ``_SIN_IN``,
``_SIN_IN_IN``) read ImageNet as RobustBench evaluates them (``preprocessing: benchmark``
keeps the benchmark's transform). ``Standard_R50`` is torchvision's ResNet-50, which
RobustBench downloads: use ``torchvision:resnet50``.

Models that output probabilities instead of logits (ensembles averaging
their members' softmax, such as the CARD decks of Diffenderfer et al. 2021) are
recognised from their output on a probe batch and flagged ``outputs_probabilities``;
the adapter's logits are then the log of the averaged probabilities.

Features of an ensemble with members ``models[i]``: the concatenation of every member's
penultimate features (the input of each member's classifier), and its classifier
``(W, b)`` is ``W = [W_1, ..., W_M] / M``, ``b = mean(b_i)``, so that
``features @ W.T + b`` is the mean of the members' logits (the ensemble's output is the
mean of their softmax, which is not linear in the features).
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import (ModelAdapter, ModelContext, _find_classifier, check_preprocessing_choice,
                                     own_preprocessing, register_model_source)
from oodbench.models.checkpoints import load_errors_as_one_line, reject_html

INSTALL_HINT = "RobustBench is not installed: pip install 'oodbench[robust]' (robustbench 1.1.1)"
PROBE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}
# RobustBench's ImageNet test transforms (robustbench.data.PREPROCESSINGS) that are a resize of
# the short side and a center crop: name -> (crop, resize, interpolation)
TRANSFORMS = {"Res256Crop224": (224, 256, "bilinear"), "BicubicRes256Crop224": (224, 256, "bicubic")}


def import_robustbench() -> tuple[Any, Any]:
    """(robustbench.utils, robustbench.model_zoo), importing ``pyautoattack`` as ``autoattack``."""
    with warnings.catch_warnings():  # pkg_resources and torch.jit deprecation notices on import
        warnings.simplefilter("ignore")
        try:
            importlib.import_module("pyautoattack")
        except ImportError:
            raise OodbenchError(INSTALL_HINT) from None
        for name, module in list(sys.modules.items()):
            if name == "pyautoattack" or name.startswith("pyautoattack."):
                sys.modules.setdefault("autoattack" + name[len("pyautoattack"):], module)
        try:
            return importlib.import_module("robustbench.utils"), importlib.import_module("robustbench.model_zoo")
        except ImportError as exc:
            raise OodbenchError(f"{INSTALL_HINT}; importing it failed: {exc}") from None


def model_names() -> dict[tuple[str, str], list[str]]:
    """RobustBench's model zoo: (dataset, threat model) -> model names."""
    _, zoo = import_robustbench()
    return {(dataset.value, threat.value): list(models)
            for dataset, by_threat in zoo.model_dicts.items() for threat, models in by_threat.items()}


def _enum(enum_type: Any, value: str, what: str) -> Any:
    choices = [member.value for member in enum_type]
    if value not in choices:
        raise OodbenchError(f"robustbench: unknown {what} '{value}'{did_you_mean(value, choices)}; "
                            f"choose one of {', '.join(choices)}")
    return enum_type(value)


class EnsembleFeatures(nn.Module):
    """An ensemble whose members' penultimate features are exposed as one classifier input.

    ``head`` has no parameters of its own: its (W, b) are built from the members'
    classifiers. It is called on the concatenated member features after the ensemble's
    own forward, so the adapter's hook on the classifier input sees them; the ensemble's
    output is returned unchanged.
    """

    def __init__(self, ensemble: nn.Module, members: nn.ModuleList):
        super().__init__()
        self.ensemble = ensemble
        self.head = _MeanLogitHead([_find_classifier(member, None) for member in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0].flatten(1)))
                   for layer in self.head.layers]
        try:
            output = self.ensemble(x)
        finally:
            for handle in handles:
                handle.remove()
        self.head(torch.cat(captured, dim=1))
        return output


class _MeanLogitHead(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers  # a plain list: the members own these modules

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([layer.weight.flatten(1) for layer in self.layers], dim=1) / len(self.layers)

    @property
    def bias(self) -> torch.Tensor:
        biases = [layer.bias if layer.bias is not None
                  else torch.zeros(layer.weight.shape[0], device=layer.weight.device) for layer in self.layers]
        return torch.stack(biases).mean(0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.weight, self.bias)


@contextmanager
def _full_unpickling(trust: bool) -> Iterator[None]:
    """RobustBench calls ``torch.load`` without ``weights_only``; trust lifts PyTorch's default."""
    if not trust:
        yield
        return
    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous


@torch.no_grad()
def _probe(net: nn.Module, size: int) -> tuple[int, bool]:
    """(number of classes, whether the outputs are probabilities) from one fixed random image."""
    device = next(net.parameters()).device
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out = net(x).float()
    is_probability = bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out), device=device),
                                                               atol=1e-4)
    return out.shape[1], is_probability


@register_model_source("robustbench")
def robustbench_model(name: str, context: ModelContext, dataset: str = "cifar10", threat_model: str = "Linf",
                      model_dir: str = "models", preprocessing: str = "model") -> ModelAdapter:
    """RobustBench model zoo, offline from model_dir/<dataset>/<threat_model>/<name>.pt (oodbench[robust])."""
    own = check_preprocessing_choice(preprocessing, f"robustbench:{name}")
    utils, zoo = import_robustbench()
    dataset_enum = _enum(zoo.enums.BenchmarkDataset, dataset, "dataset")
    threat_enum = _enum(zoo.enums.ThreatModel, threat_model, "threat model")
    threat_folder = zoo.enums.ThreatModel(threat_enum.value.replace("_3d", ""))  # as load_model does
    models = zoo.model_dicts[dataset_enum][threat_folder]
    if name not in models:
        raise OodbenchError(f"robustbench: no model '{name}' for {dataset_enum.value}/{threat_folder.value}"
                            f"{did_you_mean(name, models)}; `oodbench list models` shows them")
    gdrive_ids = models[name]["gdrive_id"]
    if gdrive_ids == "":  # built by RobustBench with pretrained=True: a torchvision download
        raise OodbenchError(f"robustbench:{name} is torchvision's pretrained network, which RobustBench downloads; "
                            "load it with the torchvision source and its local weights file instead")
    timm_name = f"{name.lower().replace('-', '_')}_{dataset_enum.value.lower()}_{threat_folder.value.lower()}"
    if gdrive_ids is None or importlib.import_module("timm").is_model(timm_name):
        raise OodbenchError(f"robustbench:{name} is distributed through the Hugging Face hub, not as a file in "
                            f"model_dir; load it with the timm source and a local checkpoint instead")
    folder = Path(model_dir).expanduser() / dataset_enum.value / threat_folder.value
    if isinstance(gdrive_ids, list):
        files = [folder / f"{name}.pt_m{i}.pt" for i in range(len(gdrive_ids))]
    else:
        files = [folder / f"{name}.pt"]
    for path in files:
        if not path.is_file():
            raise OodbenchError(f"robustbench:{name}: checkpoint not found: {path} (RobustBench's layout "
                                f"<model_dir>/<dataset>/<threat_model>/<name>.pt; oodbench does not download: "
                                f"fetch it with robustbench.utils.load_model where there is network and copy it)")
        reject_html(path)
    where = files[0] if len(files) == 1 else folder / f"{name}.pt_m*.pt"
    with _full_unpickling(context.trust_checkpoint), \
            load_errors_as_one_line(where, context.trust_checkpoint, f"robustbench:{name}"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = utils.load_model(name, model_dir=str(Path(model_dir).expanduser()), dataset=dataset_enum.value,
                               threat_model=threat_enum.value).eval()
    num_classes, outputs_probabilities = _probe(net, PROBE_SIZE[dataset_enum.value])
    members = getattr(net, "models", None)
    if isinstance(members, nn.ModuleList) and len(members) > 1:
        net = EnsembleFeatures(net, members)
    return ModelAdapter(net, num_classes=num_classes,
                        identity=f"robustbench:{dataset_enum.value}:{threat_enum.value}:{name}",
                        classifier=net.head if isinstance(net, EnsembleFeatures) else None,
                        outputs_probabilities=outputs_probabilities,
                        preprocessing=entry_transform(name, models[name].get("preprocessing")) if own else None)


def entry_transform(name: str, preprocessing: str | None) -> dict[str, Any] | None:
    """The test transform a RobustBench entry names (ImageNet entries), or None (the benchmark's)."""
    if preprocessing is None:
        return None
    if preprocessing not in TRANSFORMS:
        raise OodbenchError(f"robustbench:{name}: its test transform '{preprocessing}' is not a resize and center "
                            f"crop oodbench reproduces ({', '.join(TRANSFORMS)}); set preprocessing: benchmark")
    crop, resize, interpolation = TRANSFORMS[preprocessing]
    return own_preprocessing(crop, resize, interpolation, f"RobustBench {preprocessing}")


def zoo_listing() -> str:
    """RobustBench's model names per dataset and threat model, or how to install it."""
    try:
        names = model_names()
    except OodbenchError as exc:
        return f"robustbench models: {exc}"
    blocks = ["robustbench models (options dataset, threat_model;\n"
              "  weights in <model_dir>/<dataset>/<threat_model>/):"]
    for (dataset, threat), models in names.items():
        blocks.append(textwrap.fill(", ".join(models), width=100, initial_indent="    ", subsequent_indent="    ",
                                    break_on_hyphens=False))
        blocks[-1] = f"  {dataset} / {threat} ({len(models)}):\n{blocks[-1]}"
    return "\n".join(blocks)
