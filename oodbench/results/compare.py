"""Robust vs standard backbones, from the results store alone.

The models of an experiment tagged ``standard`` and ``robust`` are compared per
postprocessor and OOD group (near / far: the unweighted means over the group's sets, as
in the leaderboard): the metric of each model and the difference robust - standard
(with several models per tag, the difference of the tag means). A second table gives
the gain of each PRO variant over its base score, per model, for the pairs present in
the store (PRO-MSP - MSP, PRO-ENT - Entropy, PRO-MSP-T - TempScaling, PRO-GEN - GEN).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from oodbench.benchmark.config import ExperimentConfig
from oodbench.benchmark.plan import resolve_postprocessors, setting_of
from oodbench.benchmark.spec import load_benchmark
from oodbench.errors import OodbenchError
from oodbench.results.store import ResultStore
from oodbench.results.tables import AVERAGES, FPR_CAPTION, leaderboard_frame

TAGS = ("standard", "robust")
GROUPS = ("near", "far")
METRICS = {"auroc": "AUROC", "fpr": "FPR@95"}
PRO_BASES = {"pro_msp": "msp", "pro_ent": "entropy", "pro_msp_t": "temp_scaling", "pro_gen": "gen"}
DELTA = "robust - standard"


def tagged_models(config: ExperimentConfig) -> dict[str, list[str]]:
    """standard / robust -> the display names of the config's models with that tag."""
    tagged = {tag: [m.display for m in config.models if tag in m.tags] for tag in TAGS}
    absent = [tag for tag, models in tagged.items() if not models]
    if absent:
        raise OodbenchError(f"{config.source}: compare needs models tagged standard and robust; "
                            f"none is tagged {' or '.join(absent)} (add `tags: [{absent[0]}]` to a model)")
    return tagged


def comparison_results(store: ResultStore, config: ExperimentConfig, fpr: str = "classic") -> pd.DataFrame:
    """Long frame (model, tag, postprocessor, group, metric, value) of the config's cells."""
    tagged = tagged_models(config)
    tag_of = {m: tag for tag, models in tagged.items() for m in models}
    benchmark = load_benchmark(config.benchmark).name
    names = resolve_postprocessors(config.postprocessors)
    board = leaderboard_frame(store, benchmark, list(tag_of), names, fpr=fpr)
    if not board.empty:
        settings = board.postprocessor.map(lambda n: setting_of(config.search, config.params.get(n, {})))
        board = board[(board.status == "done") & (board.setting == settings)]
    absent = [m for m in tag_of if board.empty or m not in set(board.model)]
    if absent:
        raise OodbenchError(f"{store.path} has no {benchmark} results for {', '.join(absent)}; "
                            f"run `oodbench run {config.source}` first")
    rows = [{"model": row["model"], "tag": tag_of[row["model"]], "postprocessor": row["postprocessor"],
             "group": group, "metric": metric, "value": row[f"{AVERAGES[group]}|{metric}"]}
            for row in board.to_dict("records") for group in GROUPS for metric in METRICS]
    frame = pd.DataFrame(rows)
    frame.attrs.update(benchmark=benchmark, fpr=fpr, tagged=tagged, postprocessors=names)
    return frame


def _wide(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows (postprocessor, group) in config order; one column per model, standard first."""
    models = long.attrs["tagged"]["standard"] + long.attrs["tagged"]["robust"]
    wide = long[long.metric == metric].pivot(index=["postprocessor", "group"], columns="model", values="value")
    order = [(p, g) for p in long.attrs["postprocessors"] for g in GROUPS if (p, g) in wide.index]
    return wide.reindex(index=pd.MultiIndex.from_tuples(order, names=["postprocessor", "group"]), columns=models)


def delta_table(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The metric per model and robust - standard (difference of the tag means)."""
    wide = _wide(long, metric)
    tagged = long.attrs["tagged"]
    wide[DELTA] = wide[tagged["robust"]].mean(axis=1, skipna=False) - wide[tagged["standard"]].mean(axis=1, skipna=False)
    return wide


def pro_gain_table(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """PRO variant - its base score, per model and group, for the pairs present in `long`."""
    wide = _wide(long, metric)
    present = set(wide.index.get_level_values("postprocessor"))
    rows = {}
    for pro, base in PRO_BASES.items():
        if pro in present and base in present:
            for group in GROUPS:
                if (pro, group) in wide.index and (base, group) in wide.index:
                    rows[(f"{pro} - {base}", group)] = wide.loc[(pro, group)] - wide.loc[(base, group)]
    gains = pd.DataFrame.from_dict(rows, orient="index", columns=wide.columns)
    if not gains.empty:
        gains.index = pd.MultiIndex.from_tuples(gains.index, names=["pair", "group"])
    return gains


def render_table(table: pd.DataFrame, title: str, fmt: str = "markdown") -> str:
    """A comparison table x100 (2 decimals) as markdown, csv or latex, under its title."""
    from tabulate import tabulate

    if table.empty:
        return f"{title}\n\n(no pairs in the store)"
    shown = table * 100
    if fmt == "csv":
        return f"# {title}\n" + shown.to_csv(float_format="%.2f")
    body = [[*index, *("-" if np.isnan(v) else f"{v:+.2f}" if column == DELTA or " - " in index[0] else f"{v:.2f}"
                       for column, v in row.items())]
            for index, row in shown.iterrows()]
    headers = [*table.index.names, *table.columns]
    text = tabulate(body, headers=headers, tablefmt="latex" if fmt == "latex" else "pipe", disable_numparse=True,
                    colalign=["left"] * table.index.nlevels + ["right"] * len(table.columns))
    return f"{title}\n\n{text}"


def render_comparison(long: pd.DataFrame, fmt: str = "markdown") -> str:
    tagged = long.attrs["tagged"]
    intro = (f"{long.attrs['benchmark']}: robust ({', '.join(tagged['robust'])}) vs standard "
             f"({', '.join(tagged['standard'])}), near/far-OOD averages x100. "
             f"FPR@95: {FPR_CAPTION[long.attrs['fpr']]}.")
    parts = [intro]
    for metric, label in METRICS.items():
        better = "higher" if metric == "auroc" else "lower"
        parts.append(render_table(delta_table(long, metric), f"{label} per model ({better} is better)", fmt))
    for metric, label in METRICS.items():
        parts.append(render_table(pro_gain_table(long, metric), f"PRO gain over its base score: {label}", fmt))
    return "\n\n".join(parts)
