"""The one model contract every source returns.

`ModelAdapter` wraps an ``nn.Module`` so that every model takes [0,1] images (the input
normalisation happens inside), and exposes:

- ``forward(x)``: logits; for models that output probabilities (RobustBench CARD decks)
  their log, flagged by ``outputs_probabilities``;
- ``features(x)``: (penultimate features, logits), captured generically by a hook on the
  input of the final classifier layer (the last ``nn.Linear`` unless named);
- ``forward_with_extras(x)``: (features, logits, extras), the extras being the auxiliary
  tensors named by ``extras`` (`oodbench.models.heads`);
- ``fc``: the classifier's (W, b); ``num_classes``; ``identity`` and ``weights_hash`` for
  the output cache;
- ``preprocessing``: None (the benchmark's test transform), or the model's own as
  ``{"size", "resize", "interpolation", "origin"}`` (`oodbench.datasets.transform.ImageSpec.for_model`):
  timm's data config, a torchvision weights entry's transforms, a RobustBench preprocessing.

``output`` selects the logits when the network returns a tuple, dict or dataclass
(`oodbench.models.heads.select_output`). A network with **one output logit** z (a binary
classifier) is treated as the two-class logits [0, z]: softmax([0, z])[1] = sigmoid(z),
so every softmax- and logit-based score applies; ``fc`` is padded to match (a zero row),
and ``num_classes`` is 2. With ``outputs_probabilities`` a single output p is read as
the two-class log-probabilities [log(1 - p), log p].
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.heads import capture_extras, check_sources, select_output
from oodbench.registry import MODELS


def register_model_source(*names: str) -> Callable:
    """Register ``fn(name, context, **options) -> ModelAdapter`` for ``"<source>:<name>"``."""
    return MODELS.register(*names)


def own_preprocessing(size: int, resize: int, interpolation: str, origin: str) -> dict[str, Any]:
    """A model's own test transform, as `ModelAdapter.preprocessing` holds it."""
    return {"size": int(size), "resize": int(resize), "interpolation": interpolation, "origin": origin}


PREPROCESSING_CHOICES = ("model", "benchmark")


def check_preprocessing_choice(value: str | None, what: str) -> bool | None:
    """A source's ``preprocessing`` option: True for the model's own transform, False for the
    benchmark's, None (not given) for the source's default."""
    if value is not None and value not in PREPROCESSING_CHOICES:
        raise OodbenchError(f"{what}: preprocessing must be one of {', '.join(PREPROCESSING_CHOICES)}, got {value!r}")
    return None if value is None else value == "model"


@dataclass
class ModelContext:
    """What a source may need besides its own options."""

    cache_dir: Path
    data_root: Path
    device: str = "cpu"
    trust_checkpoint: bool = False


@dataclass
class ModelSpec:
    """A model entry of an experiment: ``name`` is ``"<source>:<name>"`` or a built-in name."""

    name: str
    tags: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    member: str | None = None  # the checkpoint's short name when the entry lists several (`checkpoints`)

    KEYS = ("name", "tags", "checkpoint", "checkpoints", "options", "label")

    @property
    def source(self) -> str:
        return self.name.split(":", 1)[0] if ":" in self.name else "builtin"

    @property
    def model_name(self) -> str:
        return self.name.split(":", 1)[1] if ":" in self.name else self.name

    @property
    def model_label(self) -> str:
        """The model's name in the store and in tables (its checkpoints are aggregated there)."""
        return self.label or self.name

    @property
    def display(self) -> str:
        """Unique within a run: the model's label, with the checkpoint's name for one of several."""
        return f"{self.model_label} [{self.member}]" if self.member else self.model_label


class ModelAdapter(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int,
        identity: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classifier: str | nn.Module | None = None,
        outputs_probabilities: bool = False,
        weights_hash: str | None = None,
        output: Any = None,
        extras: dict[str, Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.preprocessing = preprocessing
        self.net = net.eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.single_logit = int(num_classes) == 1
        self.num_classes = 2 if self.single_logit else int(num_classes)
        self.output = output
        self.extra_sources = check_sources(extras or {})
        self.identity = identity
        self.outputs_probabilities = outputs_probabilities
        self.has_normalization = mean is not None
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.classifier = _find_classifier(net, classifier)
        self._weights_hash = weights_hash

    @property
    def input_std(self) -> torch.Tensor:
        """Per-channel std the model divides its [0,1] input by (ones when none)."""
        return self.std.flatten() if self.has_normalization else torch.ones(1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.has_normalization else x

    def _logits(self, raw: Any) -> torch.Tensor:
        raw = select_output(raw, self.output)
        if self.single_logit and (raw.ndim == 1 or (raw.ndim == 2 and raw.shape[1] == 1)):
            z = raw.reshape(-1, 1)
            if self.outputs_probabilities:
                p = z.clamp(1e-12, 1 - 1e-12)
                return torch.cat([torch.log1p(-p), p.log()], dim=1)
            return torch.cat([torch.zeros_like(z), z], dim=1)
        return raw.clamp_min(1e-12).log() if self.outputs_probabilities else raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.net(self.normalize(x)))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits, _ = self.forward_with_extras(x)
        return features, logits

    def forward_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(penultimate features N x D, logits N x C, {name: extra N x ...}) of one forward pass."""
        captured: list[torch.Tensor] = []
        raw: list[Any] = []
        handles = [self.classifier.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0])),
                   self.net.register_forward_hook(lambda m, inputs, output: raw.append(output))]
        try:
            with capture_extras(self.net, self.extra_sources) as capture:
                logits = self.forward(x)
                extras = capture.resolve(raw[-1], x.shape[0])
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise OodbenchError(f"{self.identity}: the classifier layer was not called in forward")
        return captured[-1].flatten(1), logits, extras

    @property
    def fc(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.classifier.weight.detach().flatten(1)
        bias = self.classifier.bias
        bias = bias.detach() if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        if self.single_logit and weight.shape[0] == 1:  # logits [0, z]: a zero row before z's
            weight = torch.cat([torch.zeros_like(weight), weight])
            bias = torch.cat([torch.zeros_like(bias), bias])
        return weight, bias

    @property
    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = state_dict_hash(self.net.state_dict())
        return self._weights_hash


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(key.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _find_classifier(net: nn.Module, classifier: str | nn.Module | None) -> nn.Module:
    if isinstance(classifier, nn.Module):
        return classifier
    modules = dict(net.named_modules())
    if classifier is not None:
        if classifier not in modules:
            raise OodbenchError(f"model has no layer named '{classifier}'")
        return modules[classifier]
    candidates = [m for m in modules.values() if isinstance(m, nn.Linear)
                  or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    if not candidates:
        raise OodbenchError("model has no nn.Linear or 1x1 nn.Conv2d classifier layer")
    return candidates[-1]


def load_model(spec: ModelSpec, context: ModelContext) -> ModelAdapter:
    """Build the adapter for one experiment model entry, on `context.device`."""
    factory, options = _factory_options(spec)
    adapter = factory(spec.model_name, context, **options)
    return adapter.to(context.device)


def check_model(spec: ModelSpec) -> None:
    """What loading `spec` would refuse before reading any weights: an unknown option, and what
    the source's own ``check(name, **options)`` refuses (e.g. `openood`: an unknown architecture,
    an architecture without its checkpoint). OodbenchError, one line."""
    factory, options = _factory_options(spec)
    check = getattr(factory, "check", None)
    if check is not None:
        check(spec.model_name, **options)


def _factory_options(spec: ModelSpec) -> tuple[Callable, dict[str, Any]]:
    factory = MODELS.get(spec.source)
    options = dict(spec.options)
    if spec.checkpoint is not None:
        options["checkpoint"] = spec.checkpoint
    _check_options(spec, factory, options)
    return factory, options


def missing_checkpoint(spec: ModelSpec, data_root: Path) -> str | None:
    """One line naming the checkpoint file `spec` reads when it is absent (with the command that
    fetches it, for a source that knows one: ``locate(name, data_root, seed)``), else None. Sources
    that find their weights elsewhere (hub caches, model_dir) are checked when loaded."""
    locate = getattr(MODELS.get(spec.source), "locate", None)
    found = locate(spec.model_name, data_root, spec.options.get("seed")) if locate and not spec.checkpoint else None
    if found is not None:
        path, command = found
        return None if path.is_file() else f"checkpoint not found: {path} (needed by {spec.display}); get it with `{command}`"
    if spec.checkpoint and not Path(spec.checkpoint).expanduser().is_file():
        return f"checkpoint not found: {Path(spec.checkpoint).expanduser()} (needed by {spec.display})"
    return None


def _check_options(spec: ModelSpec, factory: Callable, options: dict[str, Any]) -> None:
    """Unknown options fail in one line with the accepted ones, not a TypeError from the source."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = list(parameters)[2:]
    for key in options:
        if key not in accepted:
            raise OodbenchError(f"model '{spec.name}': unknown option '{key}'{did_you_mean(key, accepted)}; "
                                f"accepted: {', '.join(accepted) or 'none'}")
