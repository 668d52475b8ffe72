"""Hyperparameter search on the validation split, on cached outputs.

Each combination of a method's search space is fitted (through the fit-state cache) and
scored on ID validation vs the pooled OOD validation sets; the best validation AUROC wins
(the first listed wins ties). Scores are checked against the contract on the way: shape
[N] and finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodbench.errors import OodbenchError
from oodbench.evaluators.metrics import auroc
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


def validation_auroc(method: Postprocessor, val: Outputs, ood_val: list[Outputs]) -> float:
    """AUROC of ID validation vs the pooled OOD validation sets."""
    id_scores = finite_scores(method.score(val), "ID val", len(val))
    ood_scores = np.concatenate([finite_scores(method.score(o), "OOD val", len(o)) for o in ood_val])
    return auroc(np.concatenate([id_scores, ood_scores]), np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)])


def subsample(outputs: Outputs, count: int, seed: int = 0) -> Outputs:
    """At most `count` samples of `outputs` (a seeded subset, stratified by label, in index
    order), with the matching images when the model runs again."""
    if len(outputs) <= count:
        return outputs
    from torch.utils.data import Subset

    from oodbench.datasets.base import stratified_parts

    keep = stratified_parts(outputs.labels.numpy(), {"keep": count}, seed)["keep"]
    index = torch.from_numpy(keep)
    return Outputs(logits=outputs.logits[index], features=None if outputs.features is None else outputs.features[index],
                   labels=outputs.labels[index], fc=outputs.fc, model=outputs.model,
                   inputs=None if outputs.inputs is None else Subset(outputs.inputs, keep.tolist()),
                   meta=dict(outputs.meta), extras={name: value[index] for name, value in outputs.extras.items()})


def limit_validation(val: Outputs, ood_val: list[Outputs], limit: int) -> tuple[Outputs, list[Outputs]]:
    """ID validation capped at `limit` images, and the OOD validation sets at `limit` images
    in all (each set in proportion to its size): what an input-gradient search runs on."""
    total = sum(len(o) for o in ood_val)
    shares = [max(1, int(np.floor(limit * len(o) / total))) if total > limit else len(o) for o in ood_val]
    return subsample(val, limit), [subsample(o, n) for o, n in zip(ood_val, shares)]


def search_hyperparameters(cls: type[Postprocessor], params: dict[str, Any], space: dict[str, list[Any]],
                           val: Outputs, ood_val: list[Outputs], fit) -> tuple[dict[str, Any], str | None]:
    """The combination of `space` with the best validation AUROC (the first listed wins ties),
    and a one-line note naming the combinations skipped as invalid on these outputs
    (e.g. ViM's D >= the feature dimension), or None."""
    best, chosen, skipped, reasons = -np.inf, None, [], []
    for combo in grid(space):
        candidate = cls(**{**params, **combo})
        try:
            fit(candidate)
            value = validation_auroc(candidate, val, ood_val)
        except InvalidHyperparameter as exc:
            skipped.append(", ".join(f"{k}={v}" for k, v in combo.items()))
            reasons.append(str(exc))
            continue
        if value > best:
            best, chosen = value, {**params, **combo}
    note = f"search skipped {'; '.join(skipped)} ({reasons[0]})" if skipped else None
    if chosen is None:
        raise OodbenchError(f"{cls.name}: every searched combination is invalid here: {note}")
    return chosen, note
