"""Robust vs standard backbones, from the results store alone.

The models of an experiment tagged ``standard`` and ``robust`` are compared per
postprocessor and OOD group (near / far: the unweighted means over the group's sets, as
in the leaderboard; a model with several checkpoints counts with their mean): the metric
of each model and the gain of the robust models over the standard ones (with several
models per tag, of the tag means). A second table gives the gain of each PRO variant over
its base score, per model, for the pairs present in the store (PRO-MSP over MSP, PRO-ENT
over Entropy, PRO-MSP-T over TempScaling, PRO-GEN over GEN). Gains are signed so that
positive is better: the AUROC difference, the FPR@95 reduction.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from oodbench.benchmark.config import ExperimentConfig
from oodbench.benchmark.plan import resolve_postprocessors, setting_of
from oodbench.benchmark.spec import load_benchmark
from oodbench.errors import OodbenchError
from oodbench.results.render import WIDTH
from oodbench.results.store import ResultStore
from oodbench.results.tables import AVERAGES, FPR_CAPTION, aggregate_checkpoints, leaderboard_frame, run_first

TAGS = ("standard", "robust")
GROUPS = ("near", "far")
METRICS = {"auroc": "AUROC", "fpr": "FPR@95"}
PRO_BASES = {"pro_msp": "msp", "pro_ent": "entropy", "pro_msp_t": "temp_scaling", "pro_gen": "gen"}
DELTA = "robust vs standard (gain)"
GAIN_NOTE = "gains: positive = better (AUROC up, FPR@95 down)"


def gain(better: pd.Series | float, worse: pd.Series | float, metric: str):
    """How much `better` improves on `worse`: the AUROC difference, the FPR@95 reduction."""
    return better - worse if metric == "auroc" else worse - better


def tagged_models(config: ExperimentConfig) -> dict[str, list[str]]:
    """standard / robust -> the names (in the store) of the config's models with that tag."""
    tagged = {tag: list(dict.fromkeys(m.model_label for m in config.models if tag in m.tags)) for tag in TAGS}
    absent = [tag for tag, models in tagged.items() if not models]
    if absent:
        raise OodbenchError(f"{config.source}: compare needs models tagged standard and robust; "
                            f"none is tagged {' or '.join(absent)} (add `tags: [{absent[0]}]` to a model)")
    return tagged


def comparison_results(store: ResultStore, config: ExperimentConfig, fpr: str = "classic") -> pd.DataFrame:
    """Long frame (model, tag, postprocessor, group, metric, value) of the config's cells, each
    model's checkpoints averaged; ``checkpoint`` and ``fingerprint`` name the cells (joined by +)."""
    tagged = tagged_models(config)
    tag_of = {m: tag for tag, models in tagged.items() for m in models}
    benchmark = load_benchmark(config.benchmark).name
    names = resolve_postprocessors(config.postprocessors, config.plugins)
    board = leaderboard_frame(store, benchmark, list(tag_of), names, fpr=fpr, limit=config.limit)
    if not board.empty:
        settings = board.postprocessor.map(
            lambda n: setting_of(config.search, config.params.get(n, {}), config.conventions))
        attrs, board = board.attrs, board[(board.status == "done") & (board.setting == settings)]
        board.attrs.update(attrs)
    absent = [m for m in tag_of if board.empty or m not in set(board.model)]
    if absent:
        raise OodbenchError(f"{store.path} has no {benchmark} results for {', '.join(absent)}; "
                            f"{run_first(store, benchmark, config.source, config.limit)}")
    return comparison_long(board, tagged, names)


def comparison_long(board: pd.DataFrame, tagged: dict[str, list[str]], names: list[str]) -> pd.DataFrame:
    """The long frame of `comparison_results` from `board` (`leaderboard_frame` rows, one setting
    per model and postprocessor, done), `tagged` (standard / robust -> models) and `names` (the
    postprocessors in table order)."""
    tag_of = {m: tag for tag, models in tagged.items() for m in models}
    rows = [{"model": row["model"], "tag": tag_of[row["model"]], "postprocessor": row["postprocessor"],
             "group": group, "metric": metric, "value": row[f"{AVERAGES[group]}|{metric}"],
             "checkpoint": row["checkpoint"].replace(", ", "+"), "fingerprint": "+".join(row["fingerprints"]),
             "setting": row["setting"], "checkpoints": row["checkpoints"]}
            for row in aggregate_checkpoints(board).to_dict("records") for group in GROUPS for metric in METRICS]
    frame = pd.DataFrame(rows)
    frame.attrs.update(benchmark=board.attrs["benchmark"], fpr=board.attrs["fpr"], tagged=tagged,
                       postprocessors=names, sampling=board.attrs.get("sampling", ""))
    return frame


def _wide(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows (postprocessor, group) in config order; one column per model, standard first."""
    models = long.attrs["tagged"]["standard"] + long.attrs["tagged"]["robust"]
    wide = long[long.metric == metric].pivot(index=["postprocessor", "group"], columns="model", values="value")
    order = [(p, g) for p in long.attrs["postprocessors"] for g in GROUPS if (p, g) in wide.index]
    return wide.reindex(index=pd.MultiIndex.from_tuples(order, names=["postprocessor", "group"]), columns=models)


def delta_table(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The metric per model and the gain of robust over standard (of the tag means)."""
    wide = _wide(long, metric)
    tagged = long.attrs["tagged"]
    wide[DELTA] = gain(wide[tagged["robust"]].mean(axis=1, skipna=False),
                       wide[tagged["standard"]].mean(axis=1, skipna=False), metric)
    return wide


def pro_gain_table(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The gain of each PRO variant over its base score, per model and group, for the pairs in `long`."""
    wide = _wide(long, metric)
    present = set(wide.index.get_level_values("postprocessor"))
    rows = {}
    for pro, base in PRO_BASES.items():
        if pro in present and base in present:
            for group in GROUPS:
                if (pro, group) in wide.index and (base, group) in wide.index:
                    rows[(f"{pro} vs {base}", group)] = gain(wide.loc[(pro, group)], wide.loc[(base, group)], metric)
    gains = pd.DataFrame.from_dict(rows, orient="index", columns=wide.columns)
    if not gains.empty:
        gains.index = pd.MultiIndex.from_tuples(gains.index, names=["pair", "group"])
    return gains


def comparison_tidy(long: pd.DataFrame) -> pd.DataFrame:
    """The tidy rows (`oodbench.results.tidy`): each model's near/far means (dataset ``near-OOD`` /
    ``far-OOD``, group ``mean``), the robust-vs-standard gains (model ``robust vs standard``) and
    the PRO gains (postprocessor ``<pro> vs <base>``), as ``auroc_gain`` / ``fpr95_gain``."""
    from oodbench.results.tidy import COLUMNS, MEAN_GROUP, tidy_row

    benchmark, fpr = long.attrs["benchmark"], long.attrs["fpr"]
    name = {"auroc": "auroc", "fpr": "fpr95"}
    rows = [tidy_row(benchmark=benchmark, fingerprint=r["fingerprint"], model=r["model"], checkpoint=r["checkpoint"],
                     postprocessor=r["postprocessor"], setting=r["setting"], dataset=AVERAGES[r["group"]],
                     group=MEAN_GROUP, metric=name[r["metric"]], value=r["value"],
                     fpr_convention=fpr if r["metric"] == "fpr" else "") for r in long.to_dict("records")]
    for metric in METRICS:
        for (postprocessor, group), value in delta_table(long, metric)[DELTA].items():
            rows.append(tidy_row(benchmark=benchmark, model="robust vs standard", postprocessor=postprocessor,
                                 dataset=AVERAGES[group], group=MEAN_GROUP, metric=f"{name[metric]}_gain", value=value,
                                 fpr_convention=fpr if metric == "fpr" else "", higher_is_better=True))
        for (pair, group), values in pro_gain_table(long, metric).iterrows():
            rows += [tidy_row(benchmark=benchmark, model=model, postprocessor=pair, dataset=AVERAGES[group],
                              group=MEAN_GROUP, metric=f"{name[metric]}_gain", value=value,
                              fpr_convention=fpr if metric == "fpr" else "", higher_is_better=True)
                     for model, value in values.items()]
    return pd.DataFrame(rows, columns=COLUMNS)


def value_text(value: float, signed: bool) -> str:
    """A comparison value (a fraction) x100 with 2 decimals, with its sign when `signed` (a gain); NaN: ``-``."""
    return "-" if np.isnan(value) else f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def render_table(table: pd.DataFrame, title: str, fmt: str = "markdown", signed: bool = False,
                 label: str = "tab:oodbench-compare", wide: bool = False) -> str:
    """A comparison table x100 (2 decimals; `signed`: the gain columns with their sign) as
    markdown or latex, under its title (its caption in LaTeX). A Markdown table wider than
    `WIDTH` is split into tables of as many model columns as fit (each with the row names),
    unless `wide`."""
    from tabulate import tabulate

    if table.empty:
        return f"{title}\n\n(no pairs in the store)" if fmt != "latex" else f"% {title}: no pairs in the store"
    body = [[*index, *(value_text(v, signed or column == DELTA) for column, v in row.items())]
            for index, row in table.iterrows()]
    headers = [*table.index.names, *table.columns]
    if fmt == "latex":
        from oodbench.results.latex import escape, table as latex_table, tabular

        lines = tabular([" & ".join(escape(h) for h in headers) + r" \\"],
                        "l" * table.index.nlevels + "r" * len(table.columns), [[list(map(escape, r)) for r in body]])
        return latex_table(lines, title, label, scaled=False, packages="booktabs")
    names = table.index.nlevels

    def pipe(columns: list[int]) -> str:
        return tabulate([[*r[:names], *(r[names + c] for c in columns)] for r in body],
                        headers=[*headers[:names], *(headers[names + c] for c in columns)], tablefmt="pipe",
                        disable_numparse=True, colalign=["left"] * names + ["right"] * len(columns))

    parts, columns = [], []
    for column in range(len(table.columns)):
        if columns and not wide and max(map(len, pipe(columns + [column]).splitlines())) > WIDTH:
            parts.append(pipe(columns))
            columns = []
        columns.append(column)
    parts.append(pipe(columns))
    return "\n\n".join([textwrap.fill(title, WIDTH), *parts])


def render_comparison(long: pd.DataFrame, fmt: str = "markdown", wide: bool = False) -> str:
    """Markdown (within `WIDTH` columns unless `wide`) or LaTeX tables, or the tidy CSV / JSON."""
    if fmt in ("csv", "json"):
        from oodbench.results.tidy import render_tidy

        return render_tidy(comparison_tidy(long), fmt)
    tagged = long.attrs["tagged"]
    intro = (f"{long.attrs['benchmark']}: robust ({', '.join(tagged['robust'])}) vs standard "
             f"({', '.join(tagged['standard'])}), near/far-OOD averages x100; {GAIN_NOTE}. "
             f"{FPR_CAPTION[long.attrs['fpr']]}.")
    counts = sorted(set(long.checkpoints))
    if counts[-1] > 1:
        intro += " Models with several checkpoints count with their mean."
    if long.attrs.get("sampling"):  # rows of a --limit run, where the store holds no whole one
        intro += f" {long.attrs['sampling']}"
    parts = [] if fmt == "latex" else [intro if wide else textwrap.fill(intro, WIDTH)]
    prefix = f"{intro} " if fmt == "latex" else ""
    for metric, label in METRICS.items():
        better = "higher" if metric == "auroc" else "lower"
        parts.append(render_table(delta_table(long, metric), f"{prefix}{label} per model ({better} is better) and the "
                                  "gain of the robust models", fmt, label=f"tab:oodbench-robust-{metric}", wide=wide))
    for metric, label in METRICS.items():
        parts.append(render_table(pro_gain_table(long, metric), f"{prefix}PRO gain over its base score: {label} "
                                  "(positive = better)", fmt, signed=True, label=f"tab:oodbench-pro-{metric}",
                                  wide=wide))
    return "\n\n".join(parts)
