"""Tables and the figure of detectors under attack (`oodbench attack`).

- `attack_tidy`: the leaderboard's tidy columns plus ``attack`` (``none`` on clean rows,
  ``<kind>-<norm>/<target>`` or ``adv-id:<kind>-<norm>``), ``eps`` (in [0,1] pixel units)
  and ``gradient`` (how the attack's loss was differentiated), and ``success_rate`` on
  adversarial-ID rows;
- `attack_table`: clean vs attacked AUROC and FPR@95 (the average over OOD sets) per model,
  method and eps, x100, with a caption stating the threat model;
- `robust_vs_standard`: the same attack on robust and standard models (config tags), side by side;
- `attack_figure`: AUROC vs eps per method, one panel per model (standard and robust side by side);
(The rows as the results store keeps them: `oodbench.tasks.attacks.record`.)
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from tabulate import tabulate

from oodbench.tasks.attacks.spec import eps_label
from oodbench.report.plots.style import DOUBLE_COLUMN, figure_legend, figure_title, palette, paper_style
from oodbench.report.tidy import COLUMNS, LOWER_IS_BETTER

ATTACK_COLUMNS = ["attack", "eps", "gradient"]
FPR_METRIC = {"classic": "fpr95", "openood": "fpr95_openood"}
NOT_EXACT = "†"  # marks methods attacked through a surrogate or a partial gradient


def attack_tidy(frame: pd.DataFrame, benchmark: str, fingerprint: str) -> pd.DataFrame:
    """One row per number (see the module doc); FPR@95 rows say their convention."""
    tidy = frame.rename(columns={"params": "setting"}).copy()
    tidy["params"], tidy["searched"] = frame["params"], ""  # the cell's setting column is its hyperparameters here
    tidy["status"], tidy["reason"] = "done", ""
    tidy["benchmark"], tidy["fingerprint"] = benchmark, fingerprint
    tidy["fpr_convention"] = tidy.metric.map({"fpr95": "classic", "fpr95_openood": "openood"}).fillna("")
    tidy["metric"] = tidy.metric.replace({"fpr95_openood": "fpr95"})
    tidy["higher_is_better"] = ~tidy.metric.isin(LOWER_IS_BETTER)
    extra = ["success_rate"] if "success_rate" in tidy else []
    return tidy[COLUMNS + ATTACK_COLUMNS + extra].reset_index(drop=True)


def _averages(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The ``average`` rows of `metric`, with ``method``: the postprocessor, marked `NOT_EXACT` when
    its attacks (on that model) were not differentiated exactly."""
    rows = frame[(frame.dataset == "average") & (frame.metric == metric)]
    attacked = rows[rows.attack != "none"]
    inexact = {(m, p) for m, p, g in zip(attacked.model, attacked.postprocessor, attacked.gradient.fillna(""))
               if not g.startswith("exact")}
    return rows.assign(method=[p + (NOT_EXACT if (m, p) in inexact else "")
                               for m, p in zip(rows.model, rows.postprocessor)])


def attack_table(frame: pd.DataFrame, description: str, fpr: str = "classic", fmt: str = "github") -> str:
    """Clean and attacked average AUROC and FPR@95 (x100) per model and method, one column per eps."""
    blocks = []
    for metric, title in (("auroc", "AUROC"), (FPR_METRIC[fpr], "FPR@95")):
        rows = _averages(frame, metric)
        clean = rows[rows.attack == "none"].set_index(["model", "postprocessor"]).value
        attacked = rows[rows.attack != "none"]
        table = attacked.pivot_table(index=["model", "postprocessor", "method"], columns="eps", values="value",
                                     aggfunc="first").mul(100)
        table.columns = [f"{title} eps={eps_label(e)}" for e in table.columns]
        table.insert(0, f"{title} clean", [100 * clean.get((m, p), float("nan")) for m, p, _ in table.index])
        blocks.append(table.droplevel("postprocessor"))
    table = pd.concat(blocks, axis=1).reset_index()
    caption = (f"Detectors under attack: {description}; average over the OOD test sets, x100; FPR@95 "
               f"{'ID-positive (classic)' if fpr == 'classic' else 'OOD-positive (OpenOOD)'}. Every attacked image "
               f"keeps the worse of its clean and attacked scores. {NOT_EXACT}: attacked through a surrogate or "
               "partial gradient (see the gradient column of the CSV).")
    return tabulate(table, headers="keys", tablefmt=fmt, floatfmt=".2f", showindex=False) + "\n\n" + caption


def robust_vs_standard(frame: pd.DataFrame, fmt: str = "github") -> str:
    """Average AUROC (x100) of robust and standard models under the same attack, per method and
    eps, and how much each lost to the attack; empty when the config tags no pair."""
    rows = _averages(frame, "auroc")
    kinds = {tag: rows[rows.tags.str.split(",").apply(lambda tags, t=tag: t in tags)]
             for tag in ("standard", "robust")}
    if any(part.empty for part in kinds.values()):
        return ""
    lines = []
    for attack in [a for a in dict.fromkeys(rows.attack) if a != "none"]:
        table = {}
        for tag, part in kinds.items():
            values = part.groupby(["postprocessor", "attack", "eps"]).value.mean()
            clean = part[part.attack == "none"].groupby("postprocessor").value.mean()
            for (name, kind, eps), value in values.items():
                if kind == attack:
                    entry = table.setdefault((name, eps_label(eps)), {})
                    entry[f"{tag} AUROC"], entry[f"{tag} drop"] = 100 * value, 100 * (clean[name] - value)
        shown = pd.DataFrame.from_dict(table, orient="index")
        shown.index.names = ["postprocessor", "eps"]
        shown["robust - standard"] = shown["robust AUROC"] - shown["standard AUROC"]
        lines.append(f"robust vs standard under {attack} (average AUROC x100; drop = clean - attacked):\n"
                     + tabulate(shown.reset_index(), headers="keys", tablefmt=fmt, floatfmt=".2f",
                                showindex=False))
    return "\n\n".join(lines)


@paper_style
def attack_figure(frame: pd.DataFrame, benchmark: str) -> Figure:
    """Average AUROC (x100) vs eps per method (eps = 0: clean), one panel per model."""
    rows = _averages(frame[~frame.attack.str.startswith("adv-id")], "auroc")
    models = list(dict.fromkeys(rows.model))
    methods = list(dict.fromkeys(rows.method))
    colours = dict(zip(methods, palette(len(methods))))
    figure = Figure(figsize=(DOUBLE_COLUMN, 2.6), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, models):
        part = rows[rows.model == model]
        for method in methods:
            line = part[part.method == method]
            clean = line[line.attack == "none"]
            curve = pd.concat([clean.assign(eps=0.0), line[line.attack != "none"]]).sort_values("eps")
            curve = curve.drop_duplicates("eps", keep="last")
            ax.plot(curve.eps * 255, 100 * curve.value, marker="o", markersize=3, color=colours[method],
                    linestyle="--" if method.endswith(NOT_EXACT) else "-", label=method)
        tags = ",".join(dict.fromkeys(t for t in part.tags.iloc[0].split(",") if t)) if len(part) else ""
        ax.set_title(f"{model}" + (f" ({tags})" if tags else ""))
        ax.set_xlabel("eps x 255 ([0,1] pixel units)")
    axes[0].set_ylabel("average AUROC (x100)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure_legend(figure, handles, labels)
    figure_title(figure, f"{benchmark}: AUROC under attack vs eps ({NOT_EXACT} dashed: surrogate or partial gradient)")
    return figure
