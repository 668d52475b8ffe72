"""`oodbench attack`: detectors under attack, on a finished run (its output cache and store).

The threat model comes from the config's ``attack:`` mapping (`oodbench.tasks.attacks.spec`),
each flag overriding its key. Prints clean vs attacked AUROC / FPR@95 per model, method and
eps, and robust vs standard models under the same attack; writes the tidy CSV (with
``attack``, ``eps`` and ``gradient`` columns) and the AUROC-vs-eps figure to ``--output``,
and records every clean and attacked number in the results store (table ``attacks``, one
transaction per model, method and eps as each finishes), which `leaderboard --attack` shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_attack(sub, common, overrides_of, names_type) -> None:
    parser = sub.add_parser("attack", help="clean vs attacked AUROC / FPR@95 under PGD, FGSM or APGD on the "
                                           "detector's own score (out: OOD made to look ID, in: ID made to look "
                                           "OOD, both); attacked ID images as an OOD set; from a finished run")
    common(parser)
    parser.add_argument("--kind", choices=["pgd", "fgsm", "apgd"], help="attack (default: the config's, else pgd)")
    parser.add_argument("--norm", choices=["linf", "l2"], help="L-inf or L2 ball (default linf)")
    parser.add_argument("--eps", type=names_type, metavar="A,B",
                        help="budgets in [0,1] pixel units before normalisation, e.g. 0,2/255,8/255")
    parser.add_argument("--steps", type=int, help="gradient steps per restart (default 20)")
    parser.add_argument("--restarts", type=int, help="restarts (default 1)")
    parser.add_argument("--step-size", type=float, help="step as a fraction of eps (default 2.5 / steps)")
    parser.add_argument("--schedule", choices=["constant", "halving"], help="step schedule (default constant)")
    parser.add_argument("--target", choices=["out", "in", "both"], help="which images move (default both)")
    parser.add_argument("--adversarial-id", type=names_type, metavar="fgsm,pgd,apgd",
                        help="also score ID test images attacked against the classifier as OOD sets")
    parser.add_argument("--postprocessors", type=names_type, metavar="A,B", help="only these methods of the run")
    parser.add_argument("--models", type=names_type, metavar="X,Y", help="only these models of the config")
    parser.add_argument("--fpr", choices=["classic", "openood"], help="FPR@95 convention (default: the config's)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex, or csv / json (one tidy row per number)")
    parser.add_argument("--output", default="results/attacks", help="folder for the CSV and the figure "
                                                                    "(default results/attacks)")
    parser.set_defaults(func=cmd_attack, overrides_of=overrides_of)


FLAGS = ("kind", "norm", "eps", "steps", "restarts", "step_size", "schedule", "target")


def cmd_attack(args: argparse.Namespace) -> int:
    import pandas as pd

    from oodbench.tasks.attacks.adversarial_ood import KINDS, adversarial_ood
    from oodbench.tasks.attacks.evaluate import attack_experiment
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.errors import OodbenchError
    from oodbench.report.attacks import attack_figure, attack_table, attack_tidy, robust_vs_standard, store_rows
    from oodbench.report.plots import save_figure
    from oodbench.storage.store import ResultStore
    from oodbench.report.tidy import render_tidy

    experiment = CachedExperiment.open(args.config, **args.overrides_of(args))  # --limit: the run's, as common
    spec = threat_model(experiment, {key: getattr(args, key) for key in FLAGS if getattr(args, key) is not None})
    for kind in args.adversarial_id or []:
        if kind not in KINDS:
            raise OodbenchError(f"--adversarial-id: '{kind}' is not one of {', '.join(KINDS)}")
    for name in args.postprocessors or []:
        if name not in experiment.plan.methods:
            raise OodbenchError(f"--postprocessors: '{name}' is not a postprocessor of {experiment.config.source}")
    benchmark, fpr = experiment.benchmark.name, args.fpr or experiment.config.fpr or "classic"
    store = ResultStore(experiment.config.results)
    record = lambda block: store.write_attack(  # noqa: E731
        store_rows(block, benchmark, experiment.plan.fingerprint, spec, fpr))
    try:
        frame = attack_experiment(experiment, spec, args.postprocessors, args.models, sink=record)
    finally:
        store.close()
    if args.adversarial_id:
        frame = pd.concat([frame, adversarial_ood(experiment, spec, args.adversarial_id, args.postprocessors,
                                                  args.models)], ignore_index=True)
    tidy = attack_tidy(frame, benchmark, experiment.plan.fingerprint)
    if args.format in ("csv", "json"):
        print(render_tidy(tidy, args.format).rstrip("\n"))
    else:
        fmt = "github" if args.format == "markdown" else "latex_booktabs"
        detector = frame[~frame.attack.str.startswith("adv-id")]
        print(attack_table(detector, spec.describe(), fpr, fmt))
        comparison = robust_vs_standard(detector, fmt)
        if comparison:
            print("\n" + comparison)
        if args.adversarial_id:
            print("\n" + adversarial_summary(frame, fmt))
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"attack_{benchmark}_{spec.kind}-{spec.norm}-{spec.target}"
    tidy.to_csv(folder / f"{stem}.csv", index=False)
    paths = save_figure(attack_figure(frame, benchmark), folder, stem)
    print(f"tidy CSV and figure: {folder / f'{stem}.csv'}, {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def attack_leaderboard(store, benchmarks: list[str], args: argparse.Namespace) -> str:
    """`oodbench leaderboard --attack`: per benchmark and stored threat model, clean vs attacked
    AUROC / FPR@95 per model, method and eps (markdown / LaTeX with the threat model in the
    caption, text as markdown), or the tidy rows of `oodbench attack` (CSV / JSON)."""
    import pandas as pd

    from oodbench.errors import OodbenchError
    from oodbench.report.attacks import attack_table, attack_tidy, robust_vs_standard, stored_attacks
    from oodbench.report.tidy import render_tidy

    if args.ci or args.reference or args.tables or args.average_seeds or args.wide:
        raise OodbenchError("--attack shows the stored attack runs alone; leave out --ci, --reference, --tables, "
                            "--average-seeds and --wide")
    blocks, tidies = [], []
    for benchmark in benchmarks:
        for frame, spec, fpr in stored_attacks(store, benchmark, args.model, args.postprocessor):
            if args.format in ("csv", "json"):
                tidies.append(attack_tidy(frame, benchmark, frame.data_fingerprint.to_numpy()))
                continue
            fmt = "latex_booktabs" if args.format == "latex" else "github"
            label = ", ".join(sorted(set(frame.attack) - {"none"})) or "clean rows only (killed before a budget)"
            blocks.append(f"{benchmark}, {label}:\n" + attack_table(frame, spec.describe(), args.fpr or fpr, fmt))
            comparison = robust_vs_standard(frame, fmt)
            blocks += [comparison] if comparison else []
    if not blocks and not tidies:
        raise OodbenchError(f"no attack results for {', '.join(benchmarks)} in {args.results} (run `oodbench attack "
                            "CONFIG` first)")
    return render_tidy(pd.concat(tidies), args.format) if tidies else "\n\n".join(blocks)


def threat_model(experiment, flags: dict):
    """The config's ``attack:`` with `flags` over its keys, checked (`oodbench.tasks.attacks.spec`)."""
    from oodbench.tasks.attacks.spec import parse_attack

    return parse_attack({**(experiment.config.attack or {}), **flags}, f"{experiment.config.source}: attack")


def attack_comparison(config: str, overrides: dict, fmt: str) -> str:
    """`oodbench compare --attack`: robust vs standard under the config's attack (markdown or LaTeX)."""
    from oodbench.tasks.attacks.evaluate import attack_experiment
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.errors import OodbenchError
    from oodbench.report.attacks import robust_vs_standard

    experiment = CachedExperiment.open(config, **overrides)
    if experiment.config.attack is None:
        raise OodbenchError(f"--attack: {experiment.config.source} has no 'attack:' (e.g. attack: {{kind: pgd, "
                            "eps: [8/255]}})")
    spec = threat_model(experiment, {})
    table = robust_vs_standard(attack_experiment(experiment, spec), "latex_booktabs" if fmt == "latex" else "github")
    return table or "robust vs standard under attack: the config tags no standard and robust pair"


def adversarial_summary(frame, fmt: str) -> str:
    """Per model, method and adversarial ID set: AUROC (x100) and the attack success rate."""
    from tabulate import tabulate

    rows = frame[frame.attack.str.startswith("adv-id") & (frame.metric == "auroc") & (frame.group != "mean")]
    table = rows[["model", "postprocessor", "dataset", "value", "success_rate"]].assign(
        value=lambda t: 100 * t.value, success_rate=lambda t: 100 * t.success_rate)
    table.columns = ["model", "postprocessor", "adversarial ID set", "AUROC", "attack success %"]
    return (tabulate(table, headers="keys", tablefmt=fmt, floatfmt=".2f", showindex=False)
            + "\n\nAttacked ID images as OOD (untargeted, against the classifier; budgets in [0,1] pixel units "
              "before normalisation); success = share of correctly classified ID test images made misclassified.")
