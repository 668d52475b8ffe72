"""What `oodbench attack`, `leaderboard --attack` and `compare --attack` print and write (the run
and its store rows: `oodbench.tasks.attacks.record`).

- `attack_report`: clean vs attacked per model, method and eps, robust vs standard under the
  same attack, adversarial ID sets (Markdown / LaTeX), or the tidy rows (CSV / JSON);
- `write_attack_files`: the tidy CSV and the AUROC-vs-eps figure of a run;
- `stored_attack_report`: the same tables read back from the store, per stored threat model;
- `attack_comparison`: robust vs standard under the config's own attack.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from oodbench.tasks.attacks.evaluate import attack_experiment
from oodbench.tasks.attacks.spec import AttackSpec, threat_model
from oodbench.errors import OodbenchError
from oodbench.report.attacks import attack_figure, attack_table, attack_tidy, robust_vs_standard
from oodbench.tasks.attacks.record import stored_attacks
from oodbench.report.plots import save_figure
from oodbench.storage.store import ResultStore
from oodbench.report.tidy import render_tidy

ADVERSARIAL_ID = "adv-id"  # the prefix of `adversarial_ood`'s attack labels


def _table_format(fmt: str) -> str:
    return "latex_booktabs" if fmt == "latex" else "github"


def attack_report(frame: pd.DataFrame, tidy: pd.DataFrame, spec: AttackSpec, fpr: str, fmt: str,
                  adversarial_id: bool = False, limit: int | None = None) -> str:
    """`tidy` (`attack_tidy` of `frame`) as CSV / JSON, or the tables of `frame` as Markdown / LaTeX:
    clean vs attacked, robust vs standard where the config tags a pair, and with `adversarial_id`
    the adversarial ID sets; `limit`: the ``--limit`` of the run attacked, named in the caption."""
    if fmt in ("csv", "json"):
        return render_tidy(tidy, fmt).rstrip("\n")
    table_format = _table_format(fmt)
    detector = frame[~frame.attack.str.startswith(ADVERSARIAL_ID)]
    description = spec.describe() + (f"; on the --limit {limit} run (at most {limit:,} images per split)"
                                     if limit else "")
    blocks = [attack_table(detector, description, fpr, table_format), robust_vs_standard(detector, table_format)]
    if adversarial_id:
        blocks.append(adversarial_summary(frame, table_format))
    return "\n\n".join(block for block in blocks if block)


def adversarial_summary(frame: pd.DataFrame, table_format: str) -> str:
    """Per model, method and adversarial ID set: AUROC (x100) and the attack success rate."""
    rows = frame[frame.attack.str.startswith(ADVERSARIAL_ID) & (frame.metric == "auroc") & (frame.group != "mean")]
    table = rows[["model", "postprocessor", "dataset", "value", "success_rate"]].assign(
        value=lambda t: 100 * t.value, success_rate=lambda t: 100 * t.success_rate)
    table.columns = ["model", "postprocessor", "adversarial ID set", "AUROC", "attack success %"]
    return (tabulate(table, headers="keys", tablefmt=table_format, floatfmt=".2f", showindex=False)
            + "\n\nAttacked ID images as OOD (untargeted, against the classifier; budgets in [0,1] pixel units "
              "before normalisation); success = share of correctly classified ID test images made misclassified.")


def write_attack_files(frame: pd.DataFrame, tidy: pd.DataFrame, spec: AttackSpec, benchmark: str,
                       folder: str | Path) -> list[Path]:
    """``folder/attack_<benchmark>_<kind>-<norm>-<target>.csv`` (`tidy`; `benchmark`: the run's name,
    `oodbench.benchmark.cells.run_name`, -limitN for a sampled run) and the figure of
    `frame` beside it (PNG + PDF); returns the CSV's path, then the figure's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"attack_{benchmark}_{spec.kind}-{spec.norm}-{spec.target}"
    tidy.to_csv(folder / f"{stem}.csv", index=False)
    return [folder / f"{stem}.csv", *save_figure(attack_figure(frame, benchmark), folder, stem)]


def stored_attack_report(store: ResultStore, benchmarks: list[str], models: list[str] | None = None,
                         postprocessors: list[str] | None = None, fmt: str = "markdown",
                         fpr: str | None = None) -> str:
    """Per benchmark and stored threat model: clean vs attacked AUROC / FPR@95 (in `fpr`'s
    convention, default the run's) per model, method and eps as Markdown (also for text) or
    LaTeX with the threat model in the caption, or the tidy rows of `oodbench attack` (CSV /
    JSON). Raises OodbenchError when the store holds no attack of `benchmarks`."""
    blocks, tidies = [], []
    for benchmark in benchmarks:
        for frame, spec, run_fpr in stored_attacks(store, benchmark, models, postprocessors):
            if fmt in ("csv", "json"):
                tidies.append(attack_tidy(frame, benchmark, frame.data_fingerprint.to_numpy()))
                continue
            label = ", ".join(sorted(set(frame.attack) - {"none"})) or "clean rows only (killed before a budget)"
            blocks.append(f"{benchmark}, {label}:\n"
                          + attack_table(frame, spec.describe(), fpr or run_fpr, _table_format(fmt)))
            comparison = robust_vs_standard(frame, _table_format(fmt))
            blocks += [comparison] if comparison else []
    if not blocks and not tidies:
        raise OodbenchError(f"no attack results for {', '.join(benchmarks)} in {store.path} (run `oodbench attack "
                            "CONFIG` first)")
    return render_tidy(pd.concat(tidies), fmt) if tidies else "\n\n".join(blocks)


def attack_comparison(experiment, fmt: str = "markdown") -> str:
    """Robust vs standard models (config tags) under `experiment`'s own ``attack:`` (Markdown or
    LaTeX); raises OodbenchError when the config has none."""
    if experiment.config.attack is None:
        raise OodbenchError(f"--attack: {experiment.config.source} has no 'attack:' (e.g. attack: {{kind: pgd, "
                            "eps: [8/255]}})")
    frame = attack_experiment(experiment, threat_model(experiment.config))
    table = robust_vs_standard(frame, _table_format(fmt))
    return table or "robust vs standard under attack: the config tags no standard and robust pair"
