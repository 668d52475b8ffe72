"""A user's own network, as ``torch:<path to a checkpoint>``, two ways:

- saved whole (``torch.save(model, path)``): loading it means full unpickling, which can
  run arbitrary code, so it needs ``--trust-checkpoint`` (``trust_checkpoint: true``);
- a state dict plus its class, ``module: "package.module:Class"`` or
  ``module: "path/to/file.py:Class"`` (constructor arguments in ``kwargs``): loads with
  ``weights_only=True``.

The model takes [0,1] images; give ``mean``/``std`` when it expects normalised ones.
Features are the input of its last ``nn.Linear`` (or 1x1 convolution), or of the layer
named by ``classifier``; ``outputs_probabilities: true`` when its forward ends in a softmax.
``output`` picks the logits from a tuple, dict or dataclass output (an index or a name;
list one model entry per head, each with its ``output`` and ``label``), and ``extras``
names auxiliary tensors to cache for postprocessors that read them
(`oodbench.models.heads`); a single output logit is a binary classifier's [0, z].
The file may also be given as ``checkpoint`` (or several as ``checkpoints``: one cell per
seed); ``torch:<name>`` then only names the model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from oodbench.errors import OodbenchError
from oodbench.models.adapter import ModelAdapter, ModelContext, _find_classifier, register_model_source
from oodbench.models.checkpoints import checkpoint_path, load_state_dict_into, read_checkpoint


def import_class(reference: str) -> type:
    """``package.module:Class`` or ``path/to/file.py:Class`` -> the class, or one clear error line."""
    location, _, class_name = reference.rpartition(":")
    if not location or not class_name:
        raise OodbenchError(f"module '{reference}' must look like 'package.module:Class' or 'file.py:Class'")
    try:
        if location.endswith(".py"):
            file = Path(location).expanduser().resolve()
            if not file.is_file():
                raise OodbenchError(f"model code file not found: {file}")
            module_name = f"oodbench_user_model_{file.stem}"
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
    except OodbenchError:
        raise
    except Exception as exc:  # the user's module failing to import, reported by name
        raise OodbenchError(f"could not import {location}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise OodbenchError(f"{location} has no nn.Module class '{class_name}'")
    return cls


@register_model_source("torch")
def torch_model(name: str, context: ModelContext, module: str | None = None, kwargs: dict[str, Any] | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                classifier: str | None = None, outputs_probabilities: bool = False, output: str | int | None = None,
                extras: dict[str, str] | None = None, checkpoint: str | None = None) -> ModelAdapter:
    """A user's nn.Module: torch:<file> saved whole (--trust-checkpoint) or a state dict + module: pkg.mod:Class."""
    path = checkpoint_path(checkpoint or name, "the torch source")
    if module is not None:
        cls = import_class(module)
        try:
            net = cls(**(kwargs or {}))
        except Exception as exc:
            raise OodbenchError(f"{module}(**{kwargs or {}}) failed: {type(exc).__name__}: {exc}") from None
        load_state_dict_into(net, path, module, trust=context.trust_checkpoint)
    else:
        net = read_checkpoint(path, trust=context.trust_checkpoint)
        if not isinstance(net, nn.Module):
            raise OodbenchError(f"{path} holds a {type(net).__name__}, not a whole nn.Module; name its class with "
                                f"the option module: 'package.module:Class' (or 'file.py:Class')")
    if (mean is None) != (std is None):
        raise OodbenchError(f"torch:{name}: give both 'mean' and 'std' (or neither)")
    head = _find_classifier(net, classifier)
    reading = "" if output is None and not extras else f":output={output!r}:extras={sorted((extras or {}).items())}"
    return ModelAdapter(net, num_classes=head.weight.shape[0], classifier=head,
                        identity=f"torch:{path.resolve()}:{module}:mean={mean}:std={std}{reading}",
                        mean=mean, std=std, outputs_probabilities=outputs_probabilities, output=output, extras=extras)
