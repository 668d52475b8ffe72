"""Live ``nn.Module`` objects as harness models.

`Model` says how to read a network: its input normalisation, which output holds the
logits, which auxiliary tensors to keep (extras), which layer is the classifier. `adapt`
wraps it in the harness's `ModelAdapter`, identified by its class (and the code of the
classes it is built from), its reading options, and a hash of its state dict
(`oodbench.models.adapter.state_dict_hash`), so that the output cache is reused exactly
when the weights, the code and the data are the same. While an API call runs, `registered`
lends the adapters to the model source ``python`` (``ModelSpec("python:<name>",
options={"key": ...})``), through which the runner loads them like any other model.

`borrowed` gives the network back as it was lent: the harness puts it in eval mode with
frozen parameters on its device, and the user's training mode, ``requires_grad`` flags and
device are restored afterwards.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError
from oodbench.identity import digest
from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, register_model_source, state_dict_hash
from oodbench.models.heads import check_sources, select_output, selector_text

SOURCE = "python"


@dataclass
class Model:
    """A network and how to read it.

    ``net``: any ``nn.Module`` taking a batch of images; ``normalization=(mean, std)`` (per
    channel) when it expects normalised inputs (oodbench hands it [0,1] images and
    normalises inside); ``output``: which part of its output are the logits (an index, a key,
    an attribute name or a callable; `oodbench.models.heads`); ``extras``: auxiliary tensors
    to cache, ``{name: source}``; ``classifier``: the final layer whose input are the
    features (default: the linear layer whose output are the logits, else the last one);
    ``outputs_probabilities``: its output are probabilities (their log is used); ``name``:
    the row label in tables (default: the class name).
    """

    net: nn.Module
    name: str | None = None
    normalization: tuple[Sequence[float], Sequence[float]] | None = None
    output: Any = None
    extras: Mapping[str, Any] | None = None
    classifier: str | nn.Module | None = None
    outputs_probabilities: bool = False
    tags: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or type(self.net).__name__


def as_models(model: Any, **options: Any) -> list[Model]:
    """An ``nn.Module`` (read with `options`), a `Model`, or a dict / list of them, as `Model`s
    with distinct labels."""
    if isinstance(model, Mapping):
        models = [_as_model(m, options, name=str(name)) for name, m in model.items()]
    elif isinstance(model, (list, tuple)):
        models = [_as_model(m, options) for m in model]
    else:
        models = [_as_model(model, options)]
    labels = [m.label for m in models]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise OodbenchError(f"two models are named '{repeated[0]}'; pass a dict {{name: model}} or Model(net, name=...)")
    return models


def _as_model(model: Any, options: dict[str, Any], name: str | None = None) -> Model:
    if isinstance(model, Model):
        return replace(model, name=name or model.name)
    if not isinstance(model, nn.Module):
        raise OodbenchError(f"model must be a torch nn.Module (or oodbench.Model), got {type(model).__name__}")
    return Model(model, name=name, **{k: v for k, v in options.items() if v is not None})


def class_code(net: nn.Module) -> str:
    """A hash of the code of every non-torch class the network is built from (its methods'
    bytecode), so that editing ``forward`` in a notebook changes the cache key."""
    hasher = hashlib.sha256()
    for cls in sorted({type(m) for m in net.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        hasher.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if cls.__module__.split(".")[0] == "torch":
            continue
        for attribute, value in sorted(vars(cls).items()):
            code = getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None
            if code is not None:
                hasher.update(attribute.encode() + marshal.dumps(code))
    return hasher.hexdigest()[:16]


def _probe(model: Model, image: ImageSpec, device: torch.device) -> tuple[int, nn.Module | None]:
    """(number of logits, the linear layer whose output are the logits or None) from one
    forward pass of two random images of the benchmark's shape."""
    candidates = {m for m in model.net.modules() if isinstance(m, nn.Linear)
                  or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))}
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append((m, o))) for m in candidates]
    x = torch.rand(2, image.channels, image.size, image.size, generator=torch.Generator().manual_seed(0))
    mean, std = model.normalization or (None, None)
    if mean is not None:
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    try:
        with torch.no_grad():
            raw = model.net(x.to(device))
    except Exception as exc:  # the user's network on this shape: the message is the answer
        raise OodbenchError(f"model '{model.label}' fails on a batch of {image.key()} images: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        for handle in handles:
            handle.remove()
    logits = select_output(raw, model.output)
    if logits.ndim not in (1, 2) or logits.shape[0] != 2:
        raise OodbenchError(f"model '{model.label}': its logits have shape {list(logits.shape)} for 2 images, "
                            "not [2, classes]; choose them with output=")
    heads = [m for m, out in seen if isinstance(out, torch.Tensor) and out.shape == logits.shape
             and torch.equal(out, logits)]
    return (1 if logits.ndim == 1 else int(logits.shape[1])), (heads[-1] if heads else None)


def adapt(model: Model, image: ImageSpec, device: str | torch.device) -> ModelAdapter:
    """The harness's adapter for `model`, on `device` (borrow the network with `borrowed`
    around its use: this moves it and the harness freezes it)."""
    if model.normalization is not None and (len(model.normalization) != 2):
        raise OodbenchError(f"model '{model.label}': normalization must be (mean, std), per channel")
    extras = check_sources(model.extras or {})
    model.net.to(device)  # where the harness runs it (`borrowed` moves it back)
    classes, head = _probe(model, image, torch.device(device))
    classifier = model.classifier if model.classifier is not None else head
    mean, std = model.normalization or (None, None)
    cls = type(model.net)
    identity = (f"python:{cls.__module__}.{cls.__qualname__}#{class_code(model.net)}:output="
                f"{selector_text(model.output)}:extras={ {k: selector_text(v) for k, v in extras.items()} }:"
                f"mean={_floats(mean)}:std={_floats(std)}:probabilities={model.outputs_probabilities}:"
                f"classifier={_layer_name(model.net, classifier)}")
    return ModelAdapter(model.net, num_classes=classes, identity=identity, mean=_floats(mean), std=_floats(std),
                        classifier=classifier, outputs_probabilities=model.outputs_probabilities,
                        weights_hash=state_dict_hash(model.net.state_dict()), output=model.output, extras=extras)


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in torch.as_tensor(values).flatten()]


def _layer_name(net: nn.Module, layer: Any) -> str | None:
    if isinstance(layer, nn.Module):
        return next((name for name, m in net.named_modules() if m is layer), type(layer).__name__)
    return layer


_LIVE: dict[str, ModelAdapter] = {}


@register_model_source(SOURCE)
def python_model(name: str, context: ModelContext, key: str) -> ModelAdapter:
    """The live model registered under `key` by the API call that is running."""
    if key not in _LIVE:
        raise OodbenchError(f"python model '{name}' is not loaded in this process: it exists only during the "
                            "oodbench.evaluate (or detector, operating_point) call that registered it")
    return _LIVE[key]


@contextmanager
def registered(adapters: Mapping[str, ModelAdapter], tags: Mapping[str, list[str]] | None = None
               ) -> Iterator[list[ModelSpec]]:
    """Lend ``{label: adapter}`` to the model source ``python`` for the block; yields their specs."""
    from oodbench.benchmark.jobs import _MODELS

    specs = []
    for label, adapter in adapters.items():
        key = digest([label, adapter.identity, adapter.weights_hash, id(adapter)], 24)
        _LIVE[key] = adapter
        specs.append(ModelSpec(f"{SOURCE}:{label}", tags=list((tags or {}).get(label, [])), options={"key": key},
                               label=label))
    try:
        yield specs
    finally:
        for spec in specs:
            _LIVE.pop(spec.options["key"], None)
        for cached in [k for k, v in _MODELS.items() if any(v is a for a in adapters.values())]:
            _MODELS.pop(cached, None)  # the runner's per-process model cache holds no lent network


@contextmanager
def borrowed(net: nn.Module) -> Iterator[None]:
    """Run the block with `net` as the harness leaves it (eval mode, frozen, maybe moved), then
    restore each module's training mode, each parameter's ``requires_grad`` and the device."""
    modes = [(m, m.training) for m in net.modules()]
    grads = [(p, p.requires_grad) for p in net.parameters()]
    tensor = next(iter([*net.parameters(), *net.buffers()]), None)
    device = tensor.device if tensor is not None else None
    try:
        yield
    finally:
        if device is not None:
            net.to(device)
        for module, training in modes:
            module.training = training
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


def model_device(net: nn.Module, device: str | None) -> str:
    """`device`, or the device of the network's parameters (cpu when it has none)."""
    if device is not None:
        return device
    tensor = next(iter([*net.parameters(), *net.buffers()]), None)
    return str(tensor.device) if tensor is not None else "cpu"
