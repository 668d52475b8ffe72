"""Reading checkpoint files safely, in one place, for every model source.

``read_checkpoint`` loads with ``weights_only=True``: tensors and plain containers only,
no code runs. A file that needs full unpickling (a whole ``nn.Module``, custom classes,
NumPy values or an ``argparse.Namespace`` beside the weights) is refused with a line
naming ``--trust-checkpoint``, and so is a TorchScript archive; with trust it is loaded.
Whether a refused file is such a file or a corrupt one is decided by parsing its pickle
with ``pickletools``, which runs nothing. An HTML page saved under a checkpoint's name (a
failed or blocked download, a known RobustBench failure), a plain Python pickle, a
truncated or otherwise corrupt file each give one line naming the file.
``load_weights`` fits a state dict into an architecture and reports a mismatch (wrong
architecture or class count) in one line instead of PyTorch's multi-line dump.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from oodbench.errors import OodbenchError, require_file

TRUST_HINT = "pass --trust-checkpoint (or trust_checkpoint: true in the config) only if you trust its source"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")  # "Unsupported global: GLOBAL x.Y was not allowed", "... is blocked"
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_TORCHSCRIPT_REFUSAL = "with TorchScript archives"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a file torch.save wrote in its pre-1.6 format
_HTML_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<?xml", b"<body")


KIND = "checkpoint file"


class CheckpointError(OodbenchError):
    """A checkpoint file that cannot be used as it is; the message names the file."""


def checkpoint_path(path: str | Path | None, what: str) -> Path:
    """The existing checkpoint file at `path`, or a clear error for `what` needs it."""
    if path is None:
        raise CheckpointError(f"{what} needs a checkpoint file: set 'checkpoint' in the model entry")
    resolved = Path(path).expanduser()
    return require_file(resolved, f"checkpoint not found: {resolved} (needed by {what})", KIND, CheckpointError)


def reject_html(path: Path) -> None:
    """Refuse an HTML page saved under a checkpoint's name, before any unpickler sees it."""
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    if head.startswith(_HTML_PREFIXES):
        raise CheckpointError(f"{path} is an HTML page, not a checkpoint (a failed or blocked download?); "
                              "delete it and download the file again")


@contextmanager
def load_errors_as_one_line(path: str | Path, trust: bool, what: str) -> Iterator[None]:
    """Turn what ``torch.load`` / ``load_state_dict`` raise inside the block into one line naming `path`."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        if not trust and _WEIGHTS_ONLY_REFUSAL in str(exc):
            pattern = Path(path)  # or RobustBench's name for an ensemble's member files
            files = [pattern] if pattern.is_file() else sorted(pattern.parent.glob(pattern.name))
            kinds = {pickle_kind(file) for file in files}
            kind = kinds.pop() if len(kinds) == 1 else None
            if kind == "plain":
                raise CheckpointError(_plain_pickle(path)) from None
            if kind == "torch":
                named = _REFUSED_GLOBAL.search(str(exc))
                stores = f" (it stores {named.group(1)})" if named else ""
                raise CheckpointError(f"{path} needs full unpickling{stores}, which can run arbitrary code; "
                                      f"{TRUST_HINT}") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt: {_first_line(exc)})") from None
    except RuntimeError as exc:
        if not trust and _TORCHSCRIPT_REFUSAL in str(exc):
            raise CheckpointError(f"{path} is a TorchScript archive, whose loading runs the code it holds; "
                                  f"{TRUST_HINT}") from None
        if "Error(s) in loading state_dict" in str(exc):
            raise CheckpointError(f"{path} does not fit {what} (wrong architecture or class count?): "
                                  f"{_first_line(exc)}") from None
        if "Invalid magic number" in str(exc) and pickle_kind(Path(path)) == "plain":
            raise CheckpointError(_plain_pickle(path)) from None
        reason = "truncated" if "central directory" in str(exc) else "corrupt"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}: {_first_line(exc)})") from None
    except (EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as exc:
        if _is_text(Path(path)):
            raise CheckpointError(f"{path} is a text file, not a PyTorch checkpoint (a config or a list given as "
                                  "the checkpoint?)") from None
        reason = "truncated" if isinstance(exc, EOFError) else "corrupt"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}: "
                              f"{_first_line(exc) or type(exc).__name__})") from None
    except (AttributeError, ImportError) as exc:  # trusted unpickling of a class that is not importable here
        raise CheckpointError(f"{path} refers to code that is not importable here: {_first_line(exc)}") from None


def _is_text(path: Path) -> bool:
    """Whether the file's first KiB is UTF-8 text (YAML, JSON, a list), which no torch.save writes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
        head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(head) and all(ch.isprintable() or ch in "\n\r\t" for ch in head.decode("utf-8"))


def _plain_pickle(path: str | Path) -> str:
    return (f"{path} is a plain Python pickle, not a file written by torch.save; load it in Python and save its "
            "state dict with torch.save")


def pickle_kind(path: Path) -> str | None:
    """What a file the weights-only loader refused holds, read with pickletools (nothing runs):
    "torch" (a well-formed torch.save file), "plain" (a pickle torch.save did not write), or
    None (corrupt)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = next(name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl")
                pickletools.dis(archive.read(data), out=io.StringIO())
            return "torch"
        with open(path, "rb") as handle:
            first = list(pickletools.genops(handle))
            if not any(arg == _LEGACY_MAGIC for _, arg, _ in first):
                return "plain"
            for _ in range(3):  # protocol version, system info, then the object itself
                pickletools.dis(handle, out=io.StringIO())
        return "torch"
    except Exception:  # StopIteration, ValueError, zipfile/OS errors: no well-formed pickle to read
        return None


def read_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` on CPU, weights only unless `trust`; every failure is one line naming `path`."""
    path = Path(path).expanduser()
    require_file(path, f"checkpoint not found: {path}", KIND, CheckpointError)
    reject_html(path)
    with load_errors_as_one_line(path, trust, "the model"):
        return torch.load(path, map_location="cpu", weights_only=not trust)


def read_state_dict(path: str | Path, trust: bool = False) -> Any:
    """`read_checkpoint`, and ``.safetensors`` files (tensors only, nothing to unpickle) read
    with safetensors; every failure is one line naming `path`."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        return read_checkpoint(path, trust)
    require_file(path, f"checkpoint not found: {path}", KIND, CheckpointError)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """The reason in an exception's message: its first line, or first sentence when that line is long."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # torch's advice comes first, the actual reason after it
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = text.splitlines()[0] if text else ""
    return line.split(". ")[0][:160] if len(line) > 160 else line


def extract_state_dict(payload: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: the payload itself, or under a usual wrapper key."""
    for key in WRAPPER_KEYS:
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(v, torch.Tensor) for v in payload.values()):
        kind = type(payload).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a state dict of tensors "
                              f"(looked at the top level and under {', '.join(WRAPPER_KEYS)})")
    prefix = "module."
    if all(k.startswith(prefix) for k in payload):  # saved from nn.DataParallel
        return {k[len(prefix):]: v for k, v in payload.items()}
    return dict(payload)


def load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    """``net.load_state_dict(state)``, strict, with a one-line error naming `path` and `what`."""
    expected = net.state_dict()
    state = dict(state)
    for key, value in expected.items():  # checkpoints from before PyTorch 0.4.1 lack these counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape (file vs model)", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}, e.g. {', '.join(keys[:2])}")
        raise CheckpointError(f"{path} does not fit {what} (wrong architecture or class count?): {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)
    return net


def load_state_dict_into(net: nn.Module, path: str | Path, what: str, trust: bool = False) -> nn.Module:
    """Read the checkpoint at `path` and load its state dict into `net`."""
    payload = read_checkpoint(path, trust=trust)
    return load_weights(net, extract_state_dict(payload, path), path, what)
