"""Which stored cells a leaderboard shows, and under which convention.

A benchmark's store can hold several versions of one (model, checkpoint, postprocessor,
setting): runs on other data or weights, and sampled runs (``--limit``). `select_cells`
picks the one a table shows: the latest run on whole splits, else the latest sampled one.
A cell's setting names its convention profile (``search@openood{...}``); `run_fpr` says
which FPR@95 convention it was run under. `run_first` says what to do when there is none.
"""

from __future__ import annotations

import json

import pandas as pd

from oodbench.benchmark.conventions import DEFAULT as DEFAULT_CONVENTIONS
from oodbench.benchmark.conventions import load_conventions
from oodbench.errors import OodbenchError

FPR_METRIC = {"classic": "fpr95", "openood": "fpr95_openood"}


def setting_label(setting: str) -> str:
    """``search`` -> ``[searched]``, ``default`` -> ``[default]``, explicit params -> ``T=2``;
    a convention profile other than the default is named: ``[searched, openood]``."""
    base, _, params = setting.partition("{")
    base, _, profile = base.partition("@")
    fixed = ", ".join(f"{k}={v}" for k, v in json.loads("{" + params).items()) if params else ""
    mode = {"search": "[searched]", "default": "[default]"}.get(base, f"[{base}]")
    mode = f"{mode[:-1]}, {profile}]" if profile else mode
    return f"{fixed} {mode}".strip() if fixed and base == "search" else (fixed or mode)


def stored_limits(store, benchmark: str) -> list[int]:
    """The ``--limit`` of each sampled run of `benchmark` in `store`, newest first: per (model,
    data fingerprint), the most images of a split it sampled below the split's size."""
    limited = sampled_splits(store.frame("datasets", benchmark=benchmark))
    runs = limited.groupby(["model", "data_fingerprint"]).agg(limit=("samples", "max"), created=("created", "max"))
    return list(dict.fromkeys(int(n) for n in runs.sort_values("created", ascending=False).limit))


def limited_runs(datasets: pd.DataFrame, limit: int) -> set[tuple[str, str]]:
    """(model, data fingerprint) pairs of the runs sampled with ``--limit limit``: those whose
    largest sampled split read exactly `limit` images."""
    limited = sampled_splits(datasets)
    runs = limited.groupby(["model", "data_fingerprint"]).samples.max()
    return {pair for pair, most in runs.items() if int(most) == limit}


def run_name(benchmark: str, limit: int | None) -> str:
    """The name a run's table folder and figure files go under: the benchmark's, with
    ``-limit<N>`` for a ``--limit N`` run, so a quick sampled run never overwrites (nor is
    taken for) a whole run's tables and figures."""
    return benchmark + (f"-limit{limit}" if limit else "")


def run_first(store, benchmark: str, source: str, limit: int | None) -> str:
    """What to do when a command finds no result of the run it reads: run it (with the same
    ``--limit``), or read the sampled run the store (None: none yet) holds with its ``--limit``."""
    if limit is not None:
        return f"run `oodbench run {source} --limit {limit}` first"
    limits = stored_limits(store, benchmark) if store is not None else []
    held = f", or add --limit {limits[0]} to read the --limit {limits[0]} run it holds" if limits else ""
    return f"run `oodbench run {source}` first{held}"


def sampled_splits(datasets: pd.DataFrame) -> pd.DataFrame:
    """The rows of the datasets table whose run read fewer images than the split holds (``limit``)."""
    return datasets[datasets.samples.notna() & datasets.available.notna() & (datasets.available > datasets.samples)]


def sampled_data(datasets: pd.DataFrame) -> set[tuple[str, str]]:
    """(model, data fingerprint) pairs of runs that sampled a split (``limit``: fewer images
    than the split holds)."""
    limited = sampled_splits(datasets)
    return set(zip(limited.model, limited.data_fingerprint))


def last_read(datasets: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(model, data fingerprint) -> when a run last read that data (`ResultStore.mark_read`)."""
    return datasets.groupby(["model", "data_fingerprint"]).created.max().to_dict() if not datasets.empty else {}


def newest_first(cells: pd.DataFrame, read: dict[tuple[str, str], float]) -> list[str]:
    """The data fingerprints of `cells`, the one a run read last first."""
    seen: dict[str, float] = {}
    for model, data in zip(cells.model, cells.data_fingerprint):
        if isinstance(data, str):
            seen[data] = max(seen.get(data, 0.0), read.get((model, data), 0.0))
    return sorted(seen, key=lambda data: (-seen[data], data))


def select_cells(cells: pd.DataFrame, fingerprints: list[str] | None = None, fingerprint: str | None = None,
                 every: bool = False, sampled: set[tuple[str, str]] = frozenset(),
                 read: dict[tuple[str, str], float] | None = None) -> tuple[pd.DataFrame, int]:
    """The cells a table shows, and how many other stored versions it leaves out.

    `fingerprints`: exactly these cells (a run's own). `fingerprint`: cells whose data or cell
    fingerprint starts with it. Otherwise, and unless `every`, one cell of each (model,
    checkpoint, postprocessor, setting): the one of the latest run on whole splits (`read`,
    see `last_read`; a run that found the cell stored counts, so data restored after another
    version shows its own rows), the latest computed on ties; or where it has none, the latest
    of a sampled run (`sampled`: (model, data fingerprint) pairs, see `sampled_data`), so a
    quick ``--limit`` run never hides a full one. Rows computed from other data or weights
    stay stored.
    """
    if fingerprints is not None:
        return cells[cells.fingerprint.isin(list(fingerprints))], 0
    if fingerprint:
        chosen = cells.data_fingerprint.fillna("").str.startswith(fingerprint) | cells.fingerprint.str.startswith(fingerprint)
        cells = cells[chosen]
    if every or cells.empty:
        return cells, 0
    pairs = list(zip(cells.model, cells.data_fingerprint))
    whole = [pair not in sampled for pair in pairs]
    seen = [(read or {}).get(pair, 0.0) for pair in pairs]
    chosen = (cells.assign(whole=whole, seen=seen).sort_values(["whole", "seen", "created"], kind="stable")
              .groupby(["model", "checkpoint", "postprocessor", "setting"]).tail(1))
    return cells.loc[sorted(chosen.index)], len(cells) - len(chosen)


def named_profile(setting: str) -> str:
    """`setting` with its convention profile written out (``default`` -> ``default@paper``)."""
    base, brace, params = setting.partition("{")
    return setting if "@" in base else f"{base}@{DEFAULT_CONVENTIONS}{brace}{params}"


def conventions_of(setting: str) -> str:
    """The convention profile a cell's setting names (``search@openood{...}``), else the default."""
    return setting.partition("{")[0].partition("@")[2] or DEFAULT_CONVENTIONS


def run_fpr(cells: pd.DataFrame) -> pd.Series:
    """Per cell, the FPR@95 convention it was run under: the one its run stored, else (a store
    written before runs stored it) its convention profile's."""
    stored = cells.fpr_convention if "fpr_convention" in cells else pd.Series(None, index=cells.index, dtype=object)
    return stored.where(stored.isin(list(FPR_METRIC)), cells.setting.map(_profile_fpr))


def _profile_fpr(setting: str) -> str:
    try:
        return load_conventions(conventions_of(setting)).fpr
    except OodbenchError:  # a profile this oodbench no longer ships
        return "classic"
