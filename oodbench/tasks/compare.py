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


import pandas as pd

from oodbench.benchmark.config import ExperimentConfig
from oodbench.benchmark.plan import resolve_postprocessors, setting_of
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.errors import OodbenchError
from oodbench.storage.store import ResultStore
from oodbench.benchmark.cells import limited_runs, run_first
from oodbench.benchmark.leaderboard import AVERAGES, aggregate_checkpoints, leaderboard_frame

TAGS = ("standard", "robust")
GROUPS = ("near", "far")
METRICS = {"auroc": "AUROC", "fpr": "FPR@95"}
PRO_BASES = {"pro_msp": "msp", "pro_ent": "entropy", "pro_msp_t": "temp_scaling", "pro_gen": "gen"}
DELTA = "robust vs standard (gain)"


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
    if config.limit is not None:
        require_limited_run(store, benchmark, list(tag_of), config)
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


def require_limited_run(store: ResultStore, benchmark: str, models: list[str], config: ExperimentConfig) -> None:
    """With ``--limit N``, the store must hold the ``--limit N`` run of every model (as the
    commands that read the output cache require), unless N reaches every split's size (then
    the whole run is what N reads). Raises OodbenchError naming the command to run first."""
    datasets = store.frame("datasets", benchmark=benchmark, model=models)
    if datasets.empty or config.limit >= datasets.available.max():
        return
    found = {model for model, _ in limited_runs(datasets, config.limit)}
    absent = [m for m in models if m not in found]
    if absent:
        raise OodbenchError(f"{store.path} has no --limit {config.limit} run of {', '.join(absent)} on {benchmark}; "
                            f"{run_first(store, benchmark, config.source, config.limit)}")
