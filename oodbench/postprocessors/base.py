"""The postprocessor contract.

A postprocessor turns model outputs into one OOD score per sample, and **a higher score
means more in-distribution** (OpenOOD's convention); every registered method is tested
for it. Methods declare what they need as class attributes, which the runner reads:

- ``needs_features``: uses the penultimate features ``outputs.features``;
- ``needs_model``: runs the model again for input gradients (``outputs.model``,
  ``outputs.inputs``); everything else works on cached outputs alone;
- ``needs_weights``: reads the model's parameters, not its outputs (BATS: the last
  BatchNorm's weight and bias): ``outputs.model`` is set, and no image runs through it;
- ``needs_fit``: ``fit(train_outputs, val_outputs)`` must run before ``score``;
- ``needs_extras``: names of auxiliary model outputs it reads from ``outputs.extras``
  (a latent Gaussian's ``("mu", "logvar")``); read them with ``self.required_extras``,
  which fails in one line (`MissingExtras`) when the model does not provide them, and
  the runner marks that cell missing;
- ``needs_checkpoints``: scores the outputs of every checkpoint of its model entry together
  (an ensemble): the runner scores one cell per entry, with the other checkpoints' logits in
  ``outputs.extras["checkpoint:<name>"]``; a single checkpoint is an ensemble of one;
- ``needs_layers``: reads per-sample statistics of intermediate layers, ``layer_statistics()``
  (`oodbench.models.layers.LayerStatistic`, for its hyperparameters); the runner extracts
  them once per (model, split), caches them and puts them in ``outputs.extras`` (without
  them, `oodbench.models.layers.statistic` computes them from ``outputs.model``);
- ``cache_fit``: False for a method whose fit state is (views of) the fit outputs
  themselves (Relation's bank): the fit-state cache would only store a second copy of them;
- ``fit_views``: attributes of the fit state that are the fit outputs' own tensors
  (attribute -> `Outputs` field, GrOOD's and CFOOD's ``{"bank_features": "features"}``, KNN's bank):
  the fit-state cache stores the rest of the state and, on load, points them at the fit
  split's memory-mapped tensors again, so a bank of fit features is neither copied into
  memory nor cached twice;
- ``fit_params``: the hyperparameters that change what ``fit`` computes (None: all),
  so the fit-state cache fits once for the others' whole search range;
- ``defaults``: hyperparameters and their default values;
- ``ranges``: what each hyperparameter accepts (``Number(gt=0)``, ``Integer(ge=1)``,
  ``OneOf("b", "p", "s")``...), checked when a method is built and on every searched
  value, so a bad setting fails in one line before any work; limits that depend on the
  data (ViM's D below the feature dimension) are checked later, as `InvalidHyperparameter`;
- ``search_space``: lists of values per hyperparameter for the validation search
  (built-ins read it from ``configs/postprocessors/<name>.yaml``);
- ``grid_params``: the hyperparameters whose searched values ``score_grid`` scores in one
  pass over the data (they share work: one PRO trajectory serves every K, one ODIN
  gradient every eps, one sorted kNN search every K); they must not change what ``fit``
  computes. ``score_grid`` must return exactly what ``score`` of each combination
  returns (or the `InvalidHyperparameter` it raises, in its place); by default it loops
  over ``score``;
- ``family``: the method family figures group by, one of ``FAMILIES`` (softmax-based,
  logit/energy-based, feature-based, activation shaping, gradient-based); ``other`` by default.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch

from oodbench.errors import MissingExtras, OodbenchError, did_you_mean
from oodbench.outputs import Outputs

FAMILIES = ("softmax", "logit", "feature", "activation", "gradient", "other")


class InvalidHyperparameter(OodbenchError):
    """A hyperparameter value that cannot work on these outputs (e.g. ViM's D >= feature
    dimension); the search skips such values, a plain run reports the error."""


@dataclass(frozen=True)
class Number:
    """A finite real number within the given bounds (gt/ge: above / at least, lt/le: below / at most)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    kind: ClassVar[tuple[type, ...]] = (numbers.Real,)
    noun: ClassVar[str] = "a number"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind) or not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def __str__(self) -> str:
        low = (f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None)
        high = (f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None)
        if low and high:
            return f"{self.noun} in {low}, {high}"
        bounds = [f"{sign} {bound:g}" for sign, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt),
                                                          ("<=", self.le)) if bound is not None]
        return " ".join([self.noun, *bounds])


@dataclass(frozen=True)
class Integer(Number):
    """A whole number (an int, not 2.0) within the given bounds."""

    kind: ClassVar[tuple[type, ...]] = (numbers.Integral,)
    noun: ClassVar[str] = "an integer"


@dataclass(frozen=True)
class Text:
    """A string."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def __str__(self) -> str:
        return "a string"


@dataclass(frozen=True)
class ListOf:
    """A non-empty list whose every item `item` accepts."""

    item: Any

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(self.item.accepts(v) for v in value)

    def __str__(self) -> str:
        return f"a non-empty list, each {self.item}"


class OneOf:
    """One of the listed values."""

    def __init__(self, *values: Any):
        self.values = values

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        shown = ["null" if v is None else repr(v) for v in self.values]
        return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


class Either:
    """A value that at least one of `constraints` accepts."""

    def __init__(self, *constraints: Any):
        self.constraints = constraints

    def accepts(self, value: Any) -> bool:
        return any(c.accepts(value) for c in self.constraints)

    def __str__(self) -> str:
        shown = [str(c) for c in self.constraints]
        return ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]


class Postprocessor:
    """Base class of every OOD scoring method (built-in or plugin).

    Subclass it, set ``defaults`` for your hyperparameters (and ``ranges`` for what each
    accepts), implement ``score`` (and ``fit`` when ``needs_fit``), and register with
    ``@oodbench.register_postprocessor``. Hyperparameters are available as ``self.params[name]``.
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False
    needs_weights: ClassVar[bool] = False
    cache_fit: ClassVar[bool] = True
    fit_views: ClassVar[dict[str, str]] = {}
    needs_extras: ClassVar[tuple[str, ...]] = ()
    needs_checkpoints: ClassVar[bool] = False
    needs_layers: ClassVar[bool] = False
    fit_params: ClassVar[tuple[str, ...] | None] = None
    higher_is_better: ClassVar[bool] = True
    family: ClassVar[str] = "other"
    defaults: ClassVar[dict[str, Any]] = {}
    ranges: ClassVar[dict[str, Any]] = {}
    search_space: ClassVar[dict[str, list[Any]]] = {}
    grid_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.check_names(params)
        self.params: dict[str, Any] = {**self.defaults, **params}
        for key, value in self.params.items():
            self.check_value(key, value)

    @classmethod
    def check_names(cls, params: Mapping[str, Any], where: str = "") -> None:
        """Every key of `params` must be a hyperparameter of the method."""
        for key in params:
            if key not in cls.defaults:
                takes = ", ".join(f"{k} ({cls.ranges[k]})" if k in cls.ranges else k for k in cls.defaults)
                raise OodbenchError(f"postprocessor '{cls.name}' has no hyperparameter '{key}'{where}"
                                    f"{did_you_mean(str(key), cls.defaults)}; it takes: {takes or 'none'}")

    @classmethod
    def check_value(cls, key: str, value: Any, where: str = "") -> None:
        """One line naming the method, the hyperparameter and its range when `ranges` refuses `value`."""
        allowed = cls.ranges.get(key)
        if allowed is not None and not allowed.accepts(value):
            raise OodbenchError(f"postprocessor '{cls.name}': {key}={value!r}{where} is not allowed; "
                                f"{key} must be {allowed}")

    @classmethod
    def check_search_space(cls, space: Mapping[str, list[Any]], source: str) -> None:
        """Every searched hyperparameter is one the method takes, and every listed value is in its range."""
        where = f" (searched in {source})"
        cls.check_names(space, where)
        for key, values in space.items():
            for value in values:
                cls.check_value(key, value, where)

    def layer_statistics(self) -> tuple:
        """The `oodbench.models.layers.LayerStatistic` s this method reads under its hyperparameters."""
        return ()

    def fit(self, train: Outputs, val: Outputs) -> None:
        """Fit state on ID outputs (train split, and the ID validation split)."""

    def fit_state(self) -> dict[str, Any]:
        """What `fit` set (every attribute but ``params``), for the fit-state cache."""
        return {key: value for key, value in vars(self).items() if key != "params"}

    def load_fit_state(self, state: dict[str, Any]) -> None:
        vars(self).update(state)

    def score(self, outputs: Outputs) -> torch.Tensor:
        """One score per sample, higher = more in-distribution."""
        raise NotImplementedError

    def score_grid(self, outputs: Outputs, combos: list[dict[str, Any]]
                   ) -> list[torch.Tensor | InvalidHyperparameter]:
        """The scores of `outputs` under each combination of `combos` (hyperparameters over
        this method's own, its fit state kept), in order: each exactly what `score` of that
        combination returns, or the `InvalidHyperparameter` it raises. Methods whose
        combinations share work override it."""
        scores: list[torch.Tensor | InvalidHyperparameter] = []
        for combo in combos:
            try:
                scores.append(self.with_params(combo).score(outputs))
            except InvalidHyperparameter as exc:
                scores.append(exc)
        return scores

    def with_params(self, combo: dict[str, Any]) -> "Postprocessor":
        """This method with `combo` over its hyperparameters and the same fit state."""
        if not combo:
            return self
        method = type(self)(**{**self.params, **combo})
        method.load_fit_state(self.fit_state())
        return method

    def required_extras(self, outputs: Outputs) -> dict[str, torch.Tensor]:
        """``outputs.extras[name]`` for each name of ``needs_extras``, as float tensors.

        Raises `MissingExtras` (one line naming the method and what is missing) when the
        model was not asked for them."""
        missing = [name for name in self.needs_extras if name not in outputs.extras]
        if missing:
            have = ", ".join(outputs.extras) or "none"
            wanted = ", ".join(f"'{name}': ..." for name in self.needs_extras)
            raise MissingExtras(f"postprocessor '{self.name}' needs the model's extras {', '.join(missing)} "
                                f"(these outputs have {have}); name them with extras={{{wanted}}} "
                                "(oodbench.evaluate, or the torch: model option extras)")
        return {name: outputs.extras[name].float() for name in self.needs_extras}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


BLOCK_ROWS = 4096


def in_blocks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, rows: int = BLOCK_ROWS) -> torch.Tensor:
    """`fn` on row blocks of `tensors`, concatenated: working memory bounded by the block."""
    n = tensors[0].shape[0]
    return torch.cat([fn(*(t[i : i + rows] for t in tensors)) for i in range(0, max(n, 1), rows)])


def grid(search_space: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of a search space, in the listed order (first key slowest)."""
    keys = list(search_space)
    for values in itertools.product(*(search_space[k] for k in keys)):
        yield dict(zip(keys, values))
