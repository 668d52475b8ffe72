"""What a cell reads besides its own model's cached outputs, and how the runner provides it.

- **Layer statistics** (`oodbench.models.layers`): a method's ``layer_statistics()`` under
  its hyperparameters and every searched combination (`required_statistics`) are
  extracted once per (model, split) by the split's `ExtractJob` (`ensure_statistics`: one
  forward pass for all that are not cached yet), cached in `LayerCache` under
  `oodbench.identity.layer_key_text` (the split's output key + the statistic's name), and
  put in the cell's ``outputs.extras`` (`attach`).
- **Sibling checkpoints** (``needs_checkpoints``, Ensemble): a model entry with
  ``checkpoints: [...]`` is one model per checkpoint (`checkpoint_groups`); an ensemble
  method gets one cell per entry, scored on its first checkpoint with the others' cached
  logits in ``outputs.extras["checkpoint:<name>"]``; its fingerprint names every
  checkpoint's weights (`group_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oodbench.storage.caches import LayerCache, OutputCache
from oodbench.errors import OodbenchError
from oodbench.identity import layer_key_text
from oodbench.models.layers import LayerStatistic, as_extras, extract_statistics
from oodbench.postprocessors.base import Outputs, Postprocessor, grid

CHECKPOINT_PREFIX = "checkpoint:"


def required_statistics(cls: type[Postprocessor], params: dict[str, Any], space: dict[str, list[Any]]
                        ) -> tuple[LayerStatistic, ...]:
    """Every layer statistic `cls` reads with `params` fixed, over every combination of `space`."""
    if cls.layer_statistics is Postprocessor.layer_statistics:  # reads no layer: no instance per combination
        return ()
    found: dict[LayerStatistic, None] = {}
    for combo in grid(space) if space else [{}]:
        for stat in cls(**{**params, **combo}).layer_statistics():
            found[stat] = None
    return tuple(found)


def ensure_statistics(model, dataset, output_key: str, statistics: tuple[LayerStatistic, ...], cache_dir: str | Path,
                      batch_size: int, num_workers: int, device: str) -> None:
    """Extract and cache the statistics of one split that are not cached yet (one pass for all)."""
    cache = LayerCache(cache_dir)
    missing = [s for s in statistics if cache.load(layer_key_text(output_key, s.key)) is None]
    if not missing:
        return
    values = extract_statistics(model, dataset, missing, batch_size, num_workers, device)
    for stat in missing:
        cache.save(layer_key_text(output_key, stat.key), values[stat.key])


def attach(outputs: Outputs, cache_dir: str | Path, output_key: str, statistics: tuple[LayerStatistic, ...],
           members: dict[str, str]) -> Outputs:
    """`outputs` with its cached layer statistics and the logits of the sibling checkpoints
    (`members`: name -> their output key of the same split) in ``outputs.extras``."""
    layers = LayerCache(cache_dir)
    for stat in statistics:
        values = layers.load(layer_key_text(output_key, stat.key))
        if values is not None:
            outputs.extras.update(as_extras(stat.key, values))
    cache = OutputCache(cache_dir)
    for name, key in members.items():
        member = cache.load(key)
        if member is None:
            raise OodbenchError(f"the outputs of checkpoint {name} are missing (its extraction failed)")
        outputs.extras[CHECKPOINT_PREFIX + name] = member.logits
    return outputs


def statistics_by_split(methods: list) -> dict[str, tuple[LayerStatistic, ...]]:
    """split -> every layer statistic the given methods (`MethodPlan` s) read there."""
    found: dict[str, dict[LayerStatistic, None]] = {}
    for method in methods:
        for stat in required_statistics(method.cls, method.params, method.space):
            for split in method.splits:
                found.setdefault(split, {})[stat] = None
    return {split: tuple(stats) for split, stats in found.items()}


def member_keys(others: list[str], probes: dict[str, dict[str, Any]], members: dict[str, str], splits: list[str]
                ) -> dict[str, dict[str, str]]:
    """split -> checkpoint name -> output key, for the other checkpoints (`others`, displays) of an
    ensemble cell (`members`: display -> checkpoint name)."""
    return {split: {members[d]: probes[d]["keys"][split] for d in others if split in probes.get(d, {}).get("keys", {})}
            for split in splits}


def checkpoint_groups(specs: list) -> dict[str, list[str]]:
    """display -> the displays of every checkpoint of its model entry (the same label), in order."""
    by_label: dict[str, list[str]] = {}
    for spec in specs:
        by_label.setdefault(spec.model_label, []).append(spec.display)
    return {spec.display: by_label[spec.model_label] for spec in specs}


def group_weights(probes: dict[str, dict[str, Any]], group: list[str]) -> str:
    """The weights of an ensemble: every checkpoint's hash, in order ('?' for one that failed to load)."""
    return "+".join(probes[d]["weights_hash"] if d in probes else "?" for d in group)
