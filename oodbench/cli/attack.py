"""`oodbench attack`: detectors under attack, on a finished run (its output cache and store).

The threat model comes from the config's ``attack:`` mapping (`oodbench.tasks.attacks.spec`),
each flag overriding its key. Prints clean vs attacked AUROC / FPR@95 per model, method and
eps, and robust vs standard models under the same attack; writes the tidy CSV (with
``attack``, ``eps`` and ``gradient`` columns) and the AUROC-vs-eps figure to ``--output``,
and records every clean and attacked number in the results store (table ``attacks``, one
transaction per model, method and eps as each finishes), which `leaderboard --attack` shows
(`oodbench.report.attack_report`).
"""

from __future__ import annotations

import argparse
import sys

from oodbench.cli.common import add_run_options, name_filter, names, overrides


def add_parser(sub) -> None:
    parser = sub.add_parser("attack", help="clean vs attacked AUROC / FPR@95 under PGD, FGSM or APGD on the "
                                           "detector's own score (out: OOD made to look ID, in: ID made to look "
                                           "OOD, both); attacked ID images as an OOD set; from a finished run")
    add_run_options(parser)
    parser.add_argument("--kind", choices=["pgd", "fgsm", "apgd"], help="attack (default: the config's, else pgd)")
    parser.add_argument("--norm", choices=["linf", "l2"], help="L-inf or L2 ball (default linf)")
    parser.add_argument("--eps", type=names, metavar="A,B",
                        help="budgets in [0,1] pixel units before normalisation, e.g. 0,2/255,8/255")
    parser.add_argument("--steps", type=int, help="gradient steps per restart (default 20)")
    parser.add_argument("--restarts", type=int, help="restarts (default 1)")
    parser.add_argument("--step-size", type=float, help="step as a fraction of eps (default 2.5 / steps)")
    parser.add_argument("--schedule", choices=["constant", "halving"], help="step schedule (default constant)")
    parser.add_argument("--target", choices=["out", "in", "both"], help="which images move (default both)")
    parser.add_argument("--adversarial-id", type=names, metavar="fgsm,pgd,apgd",
                        help="also score ID test images attacked against the classifier as OOD sets")
    name_filter(parser, "postprocessors", "only these methods of the run")
    name_filter(parser, "models", "only these models of the config")
    parser.add_argument("--fpr", choices=["classic", "openood"], help="FPR@95 convention (default: the config's)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex, or csv / json (one tidy row per number)")
    parser.add_argument("--output", default="results/attacks", help="folder for the CSV and the figure "
                                                                    "(default results/attacks)")
    parser.set_defaults(func=cmd_attack)


FLAGS = ("kind", "norm", "eps", "steps", "restarts", "step_size", "schedule", "target")  # keys of `attack:`


def cmd_attack(args: argparse.Namespace) -> int:
    from oodbench.tasks.attacks.spec import threat_model
    from oodbench.benchmark.cells import run_name
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.report.attack_report import attack_report, write_attack_files
    from oodbench.tasks.attacks.record import attack_and_record
    from oodbench.report.attacks import attack_tidy

    experiment = CachedExperiment.open(args.config, **overrides(args))  # --limit: the run's, as common
    spec = threat_model(experiment.config, {key: getattr(args, key) for key in FLAGS if getattr(args, key) is not None})
    benchmark, fpr = experiment.benchmark.name, args.fpr or experiment.config.fpr or "classic"
    frame = attack_and_record(experiment, spec, fpr, args.postprocessors, args.models, args.adversarial_id)
    tidy = attack_tidy(frame, benchmark, experiment.plan.fingerprint)
    print(attack_report(frame, tidy, spec, fpr, args.format, bool(args.adversarial_id), experiment.config.limit))
    table, *figures = write_attack_files(frame, tidy, spec, run_name(benchmark, experiment.config.limit), args.output)
    print(f"tidy CSV and figure: {table}, {', '.join(map(str, figures))}", file=sys.stderr)
    return 0
