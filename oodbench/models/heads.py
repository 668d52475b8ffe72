"""Which of a network's outputs are the logits, and which auxiliary tensors come along.

A network may return a tensor, a tuple, a dict or a dataclass (or namedtuple). The
**output selector** names the logits in it: ``None`` (the output is the logits), an
index into a tuple/list, a key of a dict or an attribute of a dataclass, or a callable
``fn(raw_output) -> Tensor``.

**Extras** are auxiliary per-sample tensors a postprocessor may need (a latent
Gaussian's ``mu`` and ``logvar``, a second head...), given as ``{name: source}``. A
source is, tried in this order:

1. the name of a submodule (``"encoder.mu"``): its output, captured by a forward hook;
2. a key of the network's dict output, or an attribute of its dataclass output;
3. an attribute the network sets on itself in ``forward`` (``self.mu = ...``); it must be
   set anew on every call (a stale value from an earlier batch is refused);
4. a callable ``fn(net, raw_output) -> Tensor``.

Each extra must have one row per image (shape N x ...). `selector_text` names a
selector or source for the output cache's key (a callable by its qualified name and a
hash of its code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from oodbench.errors import OodbenchError, did_you_mean


def _fields(raw: Any) -> dict[str, Any] | None:
    """The named parts of a dict, dataclass or namedtuple output (None for other outputs)."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        return {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
    if isinstance(raw, tuple) and hasattr(raw, "_fields"):
        return {name: getattr(raw, name) for name in raw._fields}
    return None


def _kind(raw: Any) -> str:
    fields = _fields(raw)
    if fields is not None:
        return f"a {type(raw).__name__} with {', '.join(map(str, fields)) or 'no fields'}"
    if isinstance(raw, (tuple, list)):
        return f"a {type(raw).__name__} of {len(raw)}"
    return f"a {type(raw).__name__}"


def select_output(raw: Any, output: Any) -> torch.Tensor:
    """The logits tensor in a network's raw output, chosen by `output` (see the module doc).

    Raises `OodbenchError` in one line naming what the network returned and how to choose."""
    if callable(output) and not isinstance(output, (str, int)):
        chosen = output(raw)
    elif output is None:
        chosen = raw
    elif isinstance(output, int) and not isinstance(output, bool) and isinstance(raw, (tuple, list)):
        if not -len(raw) <= output < len(raw):
            raise OodbenchError(f"output={output}: the model returns {_kind(raw)}")
        chosen = raw[output]
    elif isinstance(output, str) and _fields(raw) is not None:
        fields = _fields(raw)
        if output not in fields:
            raise OodbenchError(f"output='{output}': the model returns {_kind(raw)}"
                                f"{did_you_mean(output, map(str, fields))}")
        chosen = fields[output]
    else:
        raise OodbenchError(f"output={output!r} cannot select from the model's output, {_kind(raw)}")
    if not isinstance(chosen, torch.Tensor):
        hint = ("; choose the logits with output= (an index, a key or an attribute name)"
                if output is None else "")
        raise OodbenchError(f"the model's logits must be a tensor, but the model returns {_kind(raw)}{hint}")
    return chosen


def selector_text(selector: Any) -> str:
    """A stable name of an output selector or extras source, for cache keys."""
    if callable(selector) and not isinstance(selector, (str, int)):
        code = getattr(selector, "__code__", None)
        body = marshal.dumps(code) if code is not None else repr(type(selector)).encode()
        name = getattr(selector, "__qualname__", type(selector).__qualname__)
        return f"{name}#{hashlib.sha256(body).hexdigest()[:12]}"
    return repr(selector)


class ExtrasCapture:
    """Collects the extras of one forward pass; see `capture_extras`."""

    def __init__(self, net: nn.Module, sources: Mapping[str, Any]):
        self.net, self.sources = net, dict(sources)
        self.hooked: dict[str, torch.Tensor] = {}
        self.before: dict[str, int] = {}

    def resolve(self, raw: Any, batch: int) -> dict[str, torch.Tensor]:
        """Every extra of this forward pass, as ``{name: N x ... tensor}``."""
        fields = _fields(raw) or {}
        found = {}
        for name, source in self.sources.items():
            if name in self.hooked:
                value, where = self.hooked[name], f"the output of layer '{source}'"
            elif callable(source) and not isinstance(source, str):
                value, where = source(self.net, raw), f"{selector_text(source)}(net, output)"
            elif source in fields:
                value, where = fields[source], f"the model output's '{source}'"
            elif isinstance(source, str) and isinstance(getattr(self.net, source, None), torch.Tensor):
                value, where = getattr(self.net, source), f"model.{source}"
                if id(value) == self.before.get(name):
                    raise OodbenchError(f"extra '{name}': {where} was not set anew in this forward pass; "
                                        f"set self.{source} in forward(), or name a layer or an output instead")
            else:
                raise OodbenchError(f"extra '{name}': '{source}' is neither a layer of the model, an entry of "
                                    f"its output ({_kind(raw)}) nor a tensor attribute set in forward()"
                                    f"{did_you_mean(str(source), [n for n, _ in self.net.named_modules() if n])}")
            if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise OodbenchError(f"extra '{name}' ({where}) must be a tensor with one row per image "
                                    f"({batch} here), got {shape}")
            found[name] = value.detach()
        return found


@contextmanager
def capture_extras(net: nn.Module, sources: Mapping[str, Any]) -> Iterator[ExtrasCapture]:
    """Forward hooks on the layers named as extras sources, for the duration of one forward pass."""
    capture = ExtrasCapture(net, sources)
    modules = dict(net.named_modules())
    handles = []
    for name, source in capture.sources.items():
        if isinstance(source, str) and source and source in modules:
            def hook(module, inputs, output, name=name):
                capture.hooked[name] = output
            handles.append(modules[source].register_forward_hook(hook))
        elif isinstance(source, str) and isinstance(getattr(net, source, None), torch.Tensor):
            capture.before[name] = id(getattr(net, source))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def check_sources(extras: Mapping[str, Any]) -> dict[str, Any]:
    """`extras` as a dict of names to sources (strings or callables); one error line otherwise."""
    if not isinstance(extras, Mapping):
        raise OodbenchError(f"extras must map names to sources ({{'mu': 'mu', ...}}), got {type(extras).__name__}")
    for name, source in extras.items():
        if not isinstance(name, str) or not (isinstance(source, str) or callable(source)):
            raise OodbenchError(f"extras: '{name}' -> {source!r}: a source is a layer name, an output key, an "
                                "attribute name or a callable fn(net, output)")
    return dict(extras)

