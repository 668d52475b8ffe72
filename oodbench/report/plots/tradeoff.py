"""``tradeoff``: near-OOD FPR@95 against near-OOD AUROC per method (the PRO paper's Fig. 1),
a panel per model, a marker per method family (`Postprocessor.family`), read from the store."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.errors import OodbenchError
from oodbench.report.plots.style import DOUBLE_COLUMN, figure_title, palette, panels, paper_style
from oodbench.benchmark.leaderboard import AVERAGES, leaderboard_frame

FPR_SHORT = {"classic": "ID-positive", "openood": "OpenOOD convention"}
FAMILY_STYLE = {  # Postprocessor.family -> (marker, legend label)
    "softmax": ("o", "softmax-based"),
    "logit": ("s", "logit/energy-based"),
    "feature": ("D", "feature-based"),
    "activation": ("^", "activation shaping"),
    "gradient": ("*", "gradient-based"),
    "other": ("P", "other"),
}


@paper_style
def tradeoff_figure(frame: pd.DataFrame, title: str, fpr: str = "classic") -> Figure:
    """Near-OOD FPR@95 against near-OOD AUROC (both x100), one panel per model on shared
    axes: one point per method, a colour per method and a marker per method family; the
    legend has one column per family, headed by its name."""
    models = list(dict.fromkeys(frame.model))
    families = [f for f in FAMILY_STYLE if f in set(frame.family)]
    columns = {f: list(dict.fromkeys(frame[frame.family == f].postprocessor)) for f in families}
    colours = dict(zip([m for f in families for m in columns[f]], palette(len(frame.postprocessor.unique()))))
    figure, axes = panels(len(models), height=2.5, width=DOUBLE_COLUMN)
    for ax, model in zip(axes, models):
        for row in frame[frame.model == model].itertuples():
            marker = FAMILY_STYLE[row.family][0]
            ax.scatter([row.auroc], [row.fpr], marker=marker, s=60 if marker == "*" else 30,
                       color=colours[row.postprocessor], edgecolors="0.2", linewidths=0.4, label=row.postprocessor,
                       zorder=3)
        ax.grid(linewidth=0.3, color="0.85")
        ax.set(title=model, xlabel="near-OOD AUROC (x100, higher is better)",
               ylabel=f"near-OOD FPR@95, {FPR_SHORT[fpr]}\n(x100, lower is better)")
        ax.label_outer()
    for ax in axes[1:]:
        ax.sharex(axes[0])
        ax.sharey(axes[0])
    axes[0].margins(0.1)
    rows = 1 + max(len(methods) for methods in columns.values())
    handles, labels = [], []
    blank = Line2D([], [], linestyle="", marker="")
    for family in families:  # column by column: the legend fills each column before the next
        marker, name = FAMILY_STYLE[family]
        entries = [(blank, name)]
        entries += [(Line2D([], [], linestyle="", marker=marker, color=colours[m], markeredgecolor="0.2",
                            markeredgewidth=0.4, markersize=7 if marker == "*" else 5.5), m)
                    for m in columns[family]]
        entries += [(blank, "")] * (rows - len(entries))
        handles += [h for h, _ in entries]
        labels += [label for _, label in entries]
    figure.set_figheight(figure.get_figheight() + 0.15 * rows)
    legend = figure.legend(handles, labels, loc="outside lower center", ncol=len(families), handlelength=1,
                           columnspacing=1.2)
    for text in legend.get_texts():
        if text.get_text() in {FAMILY_STYLE[f][1] for f in families}:
            text.set_fontweight("bold")
    figure_title(figure, title)
    return figure


def tradeoff_data(experiment: CachedExperiment, fpr: str | None = None) -> pd.DataFrame:
    """One row per (model, postprocessor) of the config in the store (its setting, done):
    near-OOD AUROC and FPR@95 (x100; `fpr` convention, default the config's) and the method's family."""
    config, methods = experiment.config, experiment.plan.methods
    fpr = fpr or config.fpr
    if not experiment.benchmark.near:
        raise OodbenchError(f"benchmark '{experiment.benchmark.name}' has no near-OOD sets; the tradeoff plot "
                            "compares methods on them")
    board = leaderboard_frame(experiment.store, experiment.benchmark.name, [m.display for m in config.models],
                              list(methods), fpr=fpr)
    near = AVERAGES["near"]
    if not board.empty:
        settings = board.postprocessor.map(lambda name: methods[name].setting)
        board = board[(board.status == "done") & (board.setting == settings)]
        board = board.dropna(subset=[f"{near}|auroc", f"{near}|fpr"])
    if board.empty:
        raise OodbenchError(f"no near-OOD results of {config.source} in {experiment.store.path}; "
                            f"{experiment.run_first}")
    return tradeoff_points(board, {name: plan.cls.family for name, plan in methods.items()}, "postprocessor")


def tradeoff_points(board: pd.DataFrame, families: dict[str, str], name: str = "label") -> pd.DataFrame:
    """`tradeoff_figure`'s frame from `board` (`leaderboard_frame` rows, done, with near-OOD values):
    per row its model, postprocessor (the board's column `name`: the row's label, or the bare
    postprocessor where the board holds one setting of each), family (`families`: postprocessor name ->
    `Postprocessor.family`; an unknown or unlisted one counts as other) and near-OOD AUROC and
    FPR@95 (x100, the board's convention)."""
    near = AVERAGES["near"]
    family = board.postprocessor.map(lambda name: families.get(name) if families.get(name) in FAMILY_STYLE else "other")
    frame = pd.DataFrame({"model": board.model, "postprocessor": board[name], "family": family,
                          "auroc": 100 * board[f"{near}|auroc"], "fpr": 100 * board[f"{near}|fpr"]}
                         ).reset_index(drop=True)
    frame.attrs.update(near=[d for d, g in board.attrs.get("groups", {}).items() if g == "near"],
                       fpr=board.attrs["fpr"])
    return frame


def tradeoff_title(benchmark: str, points: pd.DataFrame) -> str:
    """The tradeoff figure's title: the benchmark and its near-OOD sets (`tradeoff_points`)."""
    return f"{benchmark}: near-OOD ({', '.join(points.attrs['near'])}) detection per method"
