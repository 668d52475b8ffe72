"""Hyperparameter search on the validation split, on cached outputs.

Each combination of a method's search space is fitted (through the fit-state cache) and
scored on ID validation vs the pooled OOD validation sets; the best validation AUROC wins
(the first listed wins ties). Scores are checked against the contract on the way: shape
[N] and finite. The values of a method's ``grid_params`` are scored together, one
``score_grid`` call per split for all of them (`split_grid`), so work they share is done once.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import numpy as np
import torch

from oodbench.errors import OodbenchError
from oodbench.metrics.detection import auroc_rows
from oodbench.postprocessors.base import InvalidHyperparameter, Outputs, Postprocessor, grid


class NonFiniteScores(Exception):
    """NaN or infinite values where numbers are needed: the cell fails, the grid goes on."""


class ScoreShapeError(OodbenchError):
    """A postprocessor broke the score contract: a bug in the method, so the run stops
    (unlike NaN scores, which depend on the data and only fail their cell)."""


def finite_scores(scores: torch.Tensor, what: str, samples: int) -> np.ndarray:
    """The scores as float64 after checking the contract: shape [N], every value finite."""
    scores = torch.as_tensor(scores).detach().cpu()
    scores = scores.double() if scores.is_floating_point() else scores.float()
    if tuple(scores.shape) != (samples,):
        raise ScoreShapeError(f"score() returned shape {list(scores.shape)} on {what}; "
                              f"it must return one score per sample, shape [{samples}]")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise NonFiniteScores(f"{bad} of {scores.numel()} scores on {what} are NaN or infinite")
    return scores.numpy().astype(np.float64)


def validation_aurocs(method: Postprocessor, combos: list[dict[str, Any]], val: Outputs,
                      ood_val: list[Outputs]) -> list[float | InvalidHyperparameter]:
    """AUROC of ID validation vs the pooled OOD validation sets, for each combination of `combos`
    over `method`'s hyperparameters (or why the combination is invalid on these outputs). The
    valid combinations' AUROCs come from one vectorised `auroc_rows` (bit for bit `auroc`)."""
    id_scores = method.score_grid(val, combos)
    ood_scores = [method.score_grid(o, combos) for o in ood_val]
    values: list[float | InvalidHyperparameter | None] = [None] * len(combos)
    valid: list[tuple[int, list[torch.Tensor]]] = []
    for index, scores in enumerate(id_scores):
        per_set = [scores, *(ood[index] for ood in ood_scores)]
        invalid = next((s for s in per_set if isinstance(s, InvalidHyperparameter)), None)
        if invalid is not None:
            values[index] = invalid
            continue
        valid.append((index, per_set))
    if valid:
        sizes = [len(val), *(len(o) for o in ood_val)]
        rows = [finite_rows([sets[i] for _, sets in valid], sizes[i]) for i in range(len(sizes))]
        if any(r is None for r in rows):  # say which combination and set broke the contract, in order
            for _, sets in valid:
                for i, (scores, samples) in enumerate(zip(sets, sizes)):
                    finite_scores(scores, "OOD val" if i else "ID val", samples)
        aurocs = auroc_rows(rows[0], np.concatenate(rows[1:], axis=1))
        for (index, _), value in zip(valid, aurocs):
            values[index] = value
    return values


def finite_rows(scores: list, samples: int) -> np.ndarray | None:
    """`finite_scores` of each combination's scores of one set as one B x `samples` float64
    array, checked at once; None when any breaks the contract (the caller then finds which)."""
    tensors = [torch.as_tensor(s).detach().cpu() for s in scores]
    if any(tuple(t.shape) != (samples,) for t in tensors):
        return None
    as_float64 = lambda t: t.double() if t.is_floating_point() else t.float().double()  # noqa: E731
    if len({t.dtype for t in tensors}) > 1:  # converted one by one, exactly as `finite_scores` does
        tensors = [as_float64(t) for t in tensors]
    stacked = as_float64(torch.stack(tensors))
    return stacked.numpy() if bool(torch.isfinite(stacked).all()) else None


def validation_auroc(method: Postprocessor, val: Outputs, ood_val: list[Outputs]) -> float:
    """AUROC of ID validation vs the pooled OOD validation sets."""
    value = validation_aurocs(method, [{}], val, ood_val)[0]
    if isinstance(value, InvalidHyperparameter):
        raise value
    return value


def split_grid(cls: type[Postprocessor], space: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], list[dict]]:
    """(the space searched one combination at a time, the combinations scored together by one
    ``score_grid`` call): the method's ``grid_params`` go together, unless they change its fit."""
    changes_fit = cls.needs_fit and cls.fit_params is None
    shared = [k for k in space if k in cls.grid_params and not changes_fit and k not in (cls.fit_params or ())]
    return {k: v for k, v in space.items() if k not in shared}, list(grid({k: space[k] for k in shared}))


def subsample(outputs: Outputs, count: int, seed: int = 0) -> Outputs:
    """At most `count` samples of `outputs` (a seeded subset, stratified by label, in index
    order), with the matching images when the model runs again."""
    if len(outputs) <= count:
        return outputs
    from torch.utils.data import Subset

    from oodbench.datasets.parts import stratified_parts

    keep = stratified_parts(outputs.labels.numpy(), {"keep": count}, seed)["keep"]
    index = torch.from_numpy(keep)
    return Outputs(logits=outputs.logits[index], features=None if outputs.features is None else outputs.features[index],
                   labels=outputs.labels[index], fc=outputs.fc, model=outputs.model,
                   inputs=None if outputs.inputs is None else Subset(outputs.inputs, keep.tolist()),
                   meta=dict(outputs.meta), extras={name: value[index] for name, value in outputs.extras.items()})


def limited_sizes(sizes: list[int], limit: int) -> list[int]:
    """How many images of each OOD validation set a search capped at `limit` in all uses
    (each set in proportion to its size)."""
    total = sum(sizes)
    return [max(1, int(np.floor(limit * size / total))) if total > limit else size for size in sizes]


def limit_validation(val: Outputs, ood_val: list[Outputs], limit: int) -> tuple[Outputs, list[Outputs]]:
    """ID validation capped at `limit` images, and the OOD validation sets at `limit` images
    in all (each set in proportion to its size): what an input-gradient search runs on."""
    shares = limited_sizes([len(o) for o in ood_val], limit)
    return subsample(val, limit), [subsample(o, n) for o, n in zip(ood_val, shares)]


def search_hyperparameters(cls: type[Postprocessor], params: dict[str, Any], space: dict[str, list[Any]],
                           val: Outputs, ood_val: list[Outputs], fit,
                           combinations: Callable[[dict[str, list[Any]]], Iterable[dict[str, Any]]] = grid
                           ) -> tuple[dict[str, Any], str | None]:
    """The combination of `space` with the best validation AUROC (the first in the order of
    `combinations` wins ties: by default the listed order, first key slowest; a convention
    profile's `Conventions.combinations` may visit them otherwise), and a one-line note naming
    the combinations skipped as invalid on these outputs (e.g. ViM's D >= the feature
    dimension), or None."""
    separate, together = split_grid(cls, space)
    found, skipped, reasons = {}, [], []
    for combo in grid(separate):
        candidate = cls(**{**params, **combo})
        try:
            fit(candidate)
            values = validation_aurocs(candidate, together, val, ood_val)
        except InvalidHyperparameter as exc:
            skipped.append(", ".join(f"{k}={v}" for k, v in combo.items()))
            reasons.append(str(exc))
            continue
        for shared, value in zip(together, values):
            if isinstance(value, InvalidHyperparameter):
                skipped.append(", ".join(f"{k}={v}" for k, v in {**combo, **shared}.items()))
                reasons.append(str(value))
            else:
                found[_combo_key({**combo, **shared})] = value
    best, chosen = -np.inf, None
    for combo in combinations(space):
        value = found.get(_combo_key(combo), -np.inf)
        if value > best:
            best, chosen = value, {**params, **combo}
    note = f"search skipped {'; '.join(skipped)} ({reasons[0]})" if skipped else None
    if chosen is None:
        raise OodbenchError(f"{cls.name}: every searched combination is invalid here: {note}")
    return chosen, note


def _combo_key(combo: dict[str, Any]) -> str:
    return json.dumps(combo, sort_keys=True, default=str)
