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
