"""Convention profiles: the rules that turn the same model outputs into a published table.

A profile is data (``configs/conventions/<name>.yaml``) that the run, the search and the
metrics read; no method checks which profile is active. It holds:

- ``fpr``: the FPR@95 the tables show (``classic``, ID positive, or ``openood``, OOD positive;
  both are always stored);
- ``aupr``: the AUPR rule stored as ``aupr_in`` / ``aupr_out`` (`metrics.AUPR_RULES`);
- ``search_order``: the order the search visits combinations, which breaks ties (the first
  visited of the best validation AUROC wins): ``first_slowest`` (the first listed
  hyperparameter varies slowest, `itertools.product`) or ``last_slowest`` (OpenOOD's
  ``recursive_generator``: the last listed varies slowest);
- ``params``: per postprocessor, hyperparameter defaults over the method's own (a value given
  as ``{per_benchmark: {name: value}, default: value}`` is looked up by benchmark name);
- ``search``: per postprocessor, the search lists, replacing configs/postprocessors/<name>.yaml;
- ``fit_split``: per postprocessor, the ID split its ``fit`` reads, replacing the experiment's.

A profile may ``extends:`` another; its entries replace the parent's per method. ``paper``
(the default) is empty: each method as its paper and exact optimisation define it. The cell
key names every profile but ``paper`` (`identity.cell_fingerprint`), and the table caption
names the profile.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

from oodbench.datasets.benchmarks import CONFIG_DIR, read_yaml
from oodbench.errors import OodbenchError, did_you_mean

PROFILE_DIR = CONFIG_DIR / "conventions"
DEFAULT = "paper"
FPR_CHOICES = ("classic", "openood")
AUPR_CHOICES = ("average_precision", "trapezoid")
SEARCH_ORDERS = ("first_slowest", "last_slowest")
KEYS = ("description", "extends", "fpr", "aupr", "search_order", "params", "search", "fit_split")


@dataclass(frozen=True)
class Conventions:
    name: str
    description: str = "each method as its paper defines it"
    fpr: str = "classic"
    aupr: str = "average_precision"
    search_order: str = "first_slowest"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    fit_split: dict[str, str] = field(default_factory=dict)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT

    def key(self) -> dict[str, Any]:
        """What the profile changes, for the cell key (its name and every rule)."""
        return {"name": self.name, "fpr": self.fpr, "aupr": self.aupr, "search_order": self.search_order,
                "params": self.params, "search": self.search, "fit_split": self.fit_split}

    def method_params(self, method: str, benchmark: str) -> dict[str, Any]:
        """The profile's hyperparameter defaults for `method` on `benchmark`."""
        return {key: _for_benchmark(value, benchmark) for key, value in self.params.get(method, {}).items()}

    def combinations(self, space: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
        """Every combination of `space`, in the order this profile's search visits them."""
        keys = list(space) if self.search_order == "first_slowest" else list(reversed(space))
        for values in itertools.product(*(space[k] for k in keys)):
            combo = dict(zip(keys, values))
            yield {k: combo[k] for k in space}

    def caption(self) -> str:
        return f"Conventions: {self.name} ({self.description})."


def _for_benchmark(value: Any, benchmark: str) -> Any:
    if isinstance(value, dict) and "per_benchmark" in value:
        return value["per_benchmark"].get(benchmark, value.get("default"))
    return value


def available() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_conventions(name: str) -> Conventions:
    """The profile `name` from configs/conventions/<name>.yaml (its ``extends`` chain resolved).

    Raises OodbenchError (one line, with the close matches) for an unknown name or a bad entry."""
    return _load(name, ())


def _load(name: str, seen: tuple[str, ...]) -> Conventions:
    path = PROFILE_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise OodbenchError(f"unknown conventions '{name}'{did_you_mean(str(name), available())}; "
                            f"profiles: {', '.join(available())}")
    if name in seen:
        raise OodbenchError(f"{path}: 'extends' loops back to '{name}'")
    raw = read_yaml(path, "conventions profile") or {}
    for key in raw:
        if key not in KEYS:
            raise OodbenchError(f"{path}: unknown key '{key}'{did_you_mean(str(key), KEYS)}")
    parent = _load(raw["extends"], (*seen, name)) if raw.get("extends") else Conventions(name)
    for key, choices in (("fpr", FPR_CHOICES), ("aupr", AUPR_CHOICES), ("search_order", SEARCH_ORDERS)):
        if key in raw and raw[key] not in choices:
            raise OodbenchError(f"{path}: '{key}' must be one of {', '.join(choices)}, got {raw[key]!r}")
    for key in ("params", "search", "fit_split"):
        if not isinstance(raw.get(key, {}), dict):
            raise OodbenchError(f"{path}: '{key}' maps postprocessor names to their entries")
    return Conventions(
        name=name, description=raw.get("description", parent.description), fpr=raw.get("fpr", parent.fpr),
        aupr=raw.get("aupr", parent.aupr), search_order=raw.get("search_order", parent.search_order),
        params={**parent.params, **raw.get("params", {})}, search={**parent.search, **raw.get("search", {})},
        fit_split={**parent.fit_split, **raw.get("fit_split", {})})
