"""Published reference values as data: the ledgers under ``configs/reference/<name>.csv``.

A ledger holds facts copied from a publication, one row per benchmark, method, training,
architecture and metric, each with its source and date; no number is typed in code.
Columns (all required, no others):

- ``benchmark``: the oodbench benchmark the value belongs to (``configs/benchmarks/<name>.yaml``);
- ``method``: the oodbench postprocessor name (``oodbench list postprocessors``), or the
  published name where oodbench registers no such method; ``published_method``: as published;
- ``training``, ``architecture``, ``description``, ``outlier_data`` (``yes``/``no``): the
  published model (``CrossEntropy`` training is a standard classifier with a post-hoc method);
- ``metric``: one of `METRICS`; on a full-spectrum benchmark (``*_fs``) the FS-OOD metric
  (shifted ID sets counted as ID; ``acc`` over the ID test and shifted sets);
- ``value``: x100, as published; ``std``: the published ± (standard deviation over training
  seeds), empty where none is given;
- ``fpr_convention``: ``classic`` or ``openood`` on FPR@95 rows, empty on the others;
- ``conventions``: the oodbench convention profile whose rows the value may be compared with
  (the source's evaluation code, e.g. ``openood``);
- ``source`` (URL), ``table`` (the table or file of the source), ``date`` (YYYY-MM-DD: the
  publication or the last commit of the published file).

`load_ledger` reads and checks one (any bad column or value: `OodbenchError`, one line naming
the file and line); `published_entry` finds the value a leaderboard row is compared with
(`oodbench.report.reference` does the comparison). ``tools/openood_ledger.py`` writes the
OpenOOD v1.5 ledger from the leaderboard's published CSV files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from oodbench.datasets.benchmarks import BENCHMARK_DIR, CONFIG_DIR
from oodbench.errors import OodbenchError, did_you_mean

REFERENCE_DIR = CONFIG_DIR / "reference"
COLUMNS = ("benchmark", "method", "published_method", "training", "architecture", "description", "outlier_data",
           "metric", "value", "std", "fpr_convention", "conventions", "source", "table", "date")
METRICS = ("near_auroc", "far_auroc", "near_fpr95", "far_fpr95", "acc")
KEY = ("benchmark", "method", "training", "architecture", "description", "metric")
STANDARD_TRAINING = "CrossEntropy"  # a post-hoc method on a standard classifier: what oodbench runs
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def available() -> list[str]:
    """The ledgers shipped with oodbench (``configs/reference/*.csv``), by name."""
    return sorted(path.stem for path in REFERENCE_DIR.glob("*.csv"))


def load_ledger(name: str) -> pd.DataFrame:
    """The ledger `name` (``configs/reference/<name>.csv``) or a path to a ledger CSV: one row per
    published value, ``value`` and ``std`` as floats (x100; std NaN where none was published),
    ``attrs["name"]`` and ``attrs["path"]``. Raises OodbenchError (one line) for an unknown name,
    a missing or unknown column, a bad value or a repeated key."""
    path = Path(name) if name.endswith(".csv") else REFERENCE_DIR / f"{name}.csv"
    if not path.is_file():
        raise OodbenchError(f"unknown reference '{name}'{did_you_mean(name, available())}; "
                            f"references: {', '.join(available()) or 'none'}")
    return _load(str(path.resolve())).copy()


@lru_cache(maxsize=None)
def _load(path: str) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise OodbenchError(f"{path}: not a readable ledger CSV: {str(exc).splitlines()[0]}") from None
    for column in raw.columns:
        if column not in COLUMNS:
            raise OodbenchError(f"{path}: unknown column '{column}'{did_you_mean(column, COLUMNS)}")
    absent = [c for c in COLUMNS if c not in raw.columns]
    if absent:
        raise OodbenchError(f"{path}: missing column(s) {', '.join(absent)}")
    from oodbench.benchmark.conventions import available as profiles

    benchmarks = {p.stem for p in BENCHMARK_DIR.glob("*.yaml")}
    for line, row in zip(range(2, len(raw) + 2), raw.to_dict("records")):
        problem = _problem(row, benchmarks, profiles())
        if problem:
            raise OodbenchError(f"{path} line {line}: {problem}")
    repeated = raw[raw.duplicated(list(KEY), keep=False)]
    if not repeated.empty:
        first = repeated.iloc[0]
        raise OodbenchError(f"{path} line {repeated.index[0] + 2}: {' / '.join(first[list(KEY)])} is given "
                            f"{len(raw[(raw[list(KEY)] == first[list(KEY)]).all(axis=1)])} times")
    ledger = raw.assign(value=raw.value.astype(float), std=pd.to_numeric(raw["std"].replace("", None)))
    ledger.attrs.update(name=Path(path).stem, path=path)
    return ledger


def _problem(row: dict, benchmarks: set[str], profiles: list[str]) -> str | None:
    """What is wrong with one ledger row, or None."""
    for column in ("benchmark", "method", "training", "architecture", "source", "table"):
        if not row[column].strip():
            return f"empty '{column}'"
    if row["benchmark"] not in benchmarks:
        return f"unknown benchmark '{row['benchmark']}'{did_you_mean(row['benchmark'], benchmarks)}"
    if row["metric"] not in METRICS:
        return f"metric must be one of {', '.join(METRICS)}, got '{row['metric']}'{did_you_mean(row['metric'], METRICS)}"
    for column in ("value", "std"):
        text = row[column]
        if column == "std" and text == "":
            continue
        try:
            number = float(text)
        except ValueError:
            return f"'{column}' must be a number (x100), got '{text}'"
        if not 0 <= number <= 100:
            return f"'{column}' must lie in [0, 100] (x100), got {text}"
    fpr = row["metric"].endswith("fpr95")
    if fpr and row["fpr_convention"] not in ("classic", "openood"):
        return f"an FPR@95 row needs fpr_convention classic or openood, got '{row['fpr_convention']}'"
    if not fpr and row["fpr_convention"]:
        return f"fpr_convention is only for FPR@95 rows (metric '{row['metric']}')"
    if row["conventions"] not in profiles:
        return f"unknown conventions '{row['conventions']}'; profiles: {', '.join(profiles)}"
    if row["outlier_data"] not in ("yes", "no"):
        return f"outlier_data must be yes or no, got '{row['outlier_data']}'"
    if not DATE.match(row["date"]):
        return f"date must be YYYY-MM-DD, got '{row['date']}'"
    return None


def architecture_pattern(architecture: str) -> re.Pattern:
    """A model name names `architecture` (``ResNet18`` in ``openood:cifar10_resnet18_32x32``,
    ``ViT-B/16`` in ``torchvision:vit_b_16``): its letter and digit runs in order, with at most
    one separator between them, not inside a longer name (``wide_resnet50_2`` is no ResNet50)."""
    runs = re.findall(r"[a-z]+|\d+", architecture.lower())
    tail = r"(?!\d)" if runs[-1].isdigit() else r"(?![a-z])"
    return re.compile(r"(?<![a-z])(?<!wide_)" + r"[-_/ ]?".join(runs) + tail)


@dataclass(frozen=True)
class Entry:
    """The published values a row is compared with: metric -> (value, std) x100, and whose."""
    values: dict[str, tuple[float, float]]
    architecture: str
    training: str
    description: str
    conventions: str
    fpr_convention: str
    source: str
    table: str
    date: str
    same_architecture: bool


def published_entry(ledger: pd.DataFrame, benchmark: str, method: str, model: str) -> Entry | None:
    """The ledger's values for `method` on `benchmark` with standard training: those of the
    architecture the model name names (`architecture_pattern`), else of the benchmark's first
    listed architecture (``same_architecture`` False); None when the ledger has none."""
    rows = ledger[(ledger.benchmark == benchmark) & (ledger.method == method)
                  & (ledger.training == STANDARD_TRAINING)]
    if rows.empty:
        return None
    architectures = list(dict.fromkeys(rows.architecture))
    named = [a for a in architectures if architecture_pattern(a).search(model.lower())]
    standard = ledger[(ledger.benchmark == benchmark) & (ledger.training == STANDARD_TRAINING)].architecture.iloc[0]
    chosen = named[0] if named else standard if standard in architectures else architectures[0]
    rows = rows[rows.architecture == chosen]
    rows = rows[rows.description == rows.description.iloc[0]]  # one published model
    first = rows.iloc[0]
    fpr = rows[rows.fpr_convention != ""].fpr_convention
    return Entry(values={r.metric: (r.value, r.std) for r in rows.itertuples()}, architecture=chosen,
                 training=first.training, description=first.description, conventions=first.conventions,
                 fpr_convention=fpr.iloc[0] if len(fpr) else "", source=first.source, table=first.table,
                 date=first.date, same_architecture=bool(named))
