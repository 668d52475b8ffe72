"""The published column: each leaderboard row beside a ledger's value for the same benchmark and method.

`comparisons` pairs every row of a table (`oodbench.report.render.leaderboard_rows`) with the
ledger entry `oodbench.report.ledger.published_entry` picks (standard training; the row's
architecture when the ledger has it, else the benchmark's published one, named), and per
published metric gives the published value, the difference (row minus published, x100) and
whether the published value lies inside the row's 95% bootstrap interval (``--ci``) or else
inside the row's mean ± one standard deviation over its checkpoints (seeds). A row is compared
only under the conventions the source used (its ``conventions`` column): otherwise, and for an
FPR@95 the table shows in another convention than the published one, the row says why not.
`reference_block` lays that out for the block the renderers print below the table (text and
Markdown: `oodbench.report.render`, LaTeX: `oodbench.report.latex`); `tidy_reference` adds
the same as columns to the CSV/JSON rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from oodbench.report.ledger import METRICS, STANDARD_TRAINING, published_entry
from oodbench.benchmark.cells import conventions_of
from oodbench.benchmark.leaderboard import FS, FS_ACC

AVERAGE = {"near": "near-OOD", "far": "far-OOD"}
HEADER = {"auroc": "AUROC", "fpr95": "FPR@95", "acc": "ACC"}


def table_column(metric: str, full_spectrum: bool) -> str:
    """The leaderboard column of a ledger metric (``near_auroc`` -> ``near-OOD|auroc``; on a
    full-spectrum benchmark the FS-OOD one, ``acc`` -> ``FS|acc``)."""
    if metric == "acc":
        return FS_ACC if full_spectrum else "acc"
    group, kind = metric.split("_")
    return f"{FS if full_spectrum else ''}{AVERAGE[group]}|{'fpr' if kind == 'fpr95' else kind}"


def header(metric: str, full_spectrum: bool) -> str:
    group, _, kind = metric.partition("_")
    name = HEADER["acc"] if metric == "acc" else f"{group} {HEADER[kind]}"
    return f"FS {name}" if full_spectrum else name


def inside(published: float, low: float, high: float, mean: float, std: float) -> tuple[str, str]:
    """(``yes``/``no``/``-``, basis ``CI``/``sd``/''): `published` (x100) within [low, high], else
    within mean ± std (fractions); ``-`` with neither."""
    if not np.isnan(low):
        return ("yes" if low - 1e-12 <= published / 100 <= high + 1e-12 else "no"), "CI"
    if not np.isnan(std):
        return ("yes" if abs(mean - published / 100) <= std + 1e-12 else "no"), "sd"
    return "-", ""


def data_caveat(rows: pd.DataFrame) -> str:
    """How the data of `rows` differ from the published benchmark's, '' when they do not: OOD sets
    missing (what each average then covers), splits read from a fallback source instead of the
    benchmark's published lists, sampled images."""
    groups, missing = rows.attrs.get("groups", {}), rows.attrs.get("missing", [])
    parts = []
    for group, name in AVERAGE.items():
        sets = [d for d in rows.attrs.get("datasets", []) if groups.get(d) == group]  # the benchmark's order
        gone = [d for d in sets if d in missing]
        if gone:
            kept = [d for d in sets if d not in missing]
            parts.append(f"{name} over {', '.join(kept) or 'no set'} only ({', '.join(gone)} missing)")
    if rows.attrs.get("csid_missing"):
        parts.append(f"FS without the shifted ID sets {', '.join(rows.attrs['csid_missing'])}")
    if rows.attrs.get("fallback"):
        parts.append(f"{', '.join(rows.attrs['fallback'])} read from fallback sources, not the published lists")
    if rows.attrs.get("sampling"):
        parts.append(f"sampled: {rows.attrs['sampling']}")
    return "the data differ from the published benchmark's: " + "; ".join(parts) if parts else ""


def comparisons(rows: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """One record per (row index, published metric): ``published``, ``std`` (x100), ``architecture``,
    ``same_architecture``, ``source``, and either ``difference`` (x100), ``inside`` and ``basis`` or
    the ``reason`` it is not compared; a row the ledger has no value for has one record (metric '')
    with its reason."""
    benchmark = rows.attrs["benchmark"]
    full_spectrum = bool(rows.attrs.get("csid"))
    caveat = data_caveat(rows)
    records = []
    for index, row in zip(rows.index, rows.to_dict("records")):
        entry = published_entry(ledger, benchmark, row["postprocessor"], row["model"])
        if entry is None:
            records.append({"row": index, "metric": "", "reason": f"{ledger.attrs['name']} has no "
                            f"{STANDARD_TRAINING} value for {row['postprocessor']} on {benchmark}"})
            continue
        profile = conventions_of(row["setting"])
        reason = (f"ran under the {profile} conventions, the published values under {entry.conventions} "
                  f"(run with --conventions {entry.conventions})" if profile != entry.conventions
                  else "" if row["status"] == "done" else f"the row {row['status']}")
        for metric in [m for m in METRICS if m in entry.values]:
            value, std = entry.values[metric]
            record = {"row": index, "metric": metric, "published": value, "std": std, "reason": reason,
                      "architecture": entry.architecture, "same_architecture": entry.same_architecture,
                      "source": f"{entry.source} ({entry.table}, {entry.date})"}
            if not reason and metric.endswith("fpr95") and rows.attrs["fpr"] != entry.fpr_convention:
                record["reason"] = (f"FPR@95 published in the {entry.fpr_convention} convention, shown here in "
                                    f"the {rows.attrs['fpr']} one (--fpr {entry.fpr_convention})")
            if not record["reason"]:
                column = table_column(metric, full_spectrum)
                mean = row.get(column, np.nan)
                verdict, basis = inside(value, row.get(f"{column}|low", np.nan), row.get(f"{column}|high", np.nan),
                                        mean, row.get(f"{column}|std", np.nan))
                record.update(difference=100 * mean - value, inside=verdict if not np.isnan(mean) else "-",
                              basis=basis, caveat=caveat)
            records.append(record)
    return pd.DataFrame(records, columns=["row", "metric", "published", "std", "architecture", "same_architecture",
                                          "difference", "inside", "basis", "source", "reason", "caveat"])


def nothing_published(rows: pd.DataFrame, ledger: pd.DataFrame) -> str:
    """One line in place of the block when `ledger` has no value for any row of `rows` ('' when it
    has one): the benchmarks it covers, or the methods it lacks on a benchmark it covers."""
    benchmark = rows.attrs["benchmark"]
    if not (ledger.benchmark == benchmark).any():
        return (f"{ledger.attrs['name']} publishes nothing for {benchmark}; it covers "
                f"{', '.join(dict.fromkeys(ledger.benchmark))}")
    if (comparisons(rows, ledger).metric != "").any():
        return ""
    return (f"{ledger.attrs['name']} publishes no {STANDARD_TRAINING} value on {benchmark} for "
            f"{', '.join(dict.fromkeys(rows.postprocessor))}")


def _published_text(record: dict) -> str:
    std = record["std"]
    return f"{record['published']:.2f}" + ("" if np.isnan(std) else f"±{std:.2f}")


def _delta_text(record: dict) -> str:
    if record["reason"] or pd.isna(record["difference"]):
        return "-"
    return f"{record['difference']:+.2f}" + (f" {record['inside']}" if record["inside"] != "-" else "")


def architecture_text(record: dict) -> str:
    if pd.isna(record["architecture"]):
        return "-"
    return record["architecture"] + ("" if record["same_architecture"] else " (not this model's)")


def reference_table(rows: pd.DataFrame, ledger: pd.DataFrame) -> tuple[pd.DataFrame, list[str], str, list[str]]:
    """(comparisons, shown metrics, legend, notes) of the published block."""
    full_spectrum = bool(rows.attrs.get("csid"))
    found = comparisons(rows, ledger)
    shown = [m for m in METRICS if (found.metric == m).any()]
    reasons: dict[str, list[str]] = {}
    for record in found[found.reason != ""].to_dict("records"):
        label = f"{rows.model[record['row']]} / {rows.label[record['row']]}" + (
            f" ({header(record['metric'], full_spectrum)})" if "FPR@95" in record["reason"] else "")
        if label not in reasons.setdefault(record["reason"], []):
            reasons[record["reason"]].append(label)
    notes = [f"- not compared, {reason}: {', '.join(labels)}" for reason, labels in reasons.items()]
    notes += [f"- Δ is not like for like, {caveat}" for caveat in dict.fromkeys(found.caveat.dropna()) if caveat]
    sources = sorted(set(found.source.dropna()))
    bases = set(found.basis.dropna()) - {""}
    compared = bool(((found.reason == "") & (found.metric != "")).any())
    legend = (f"Published reference {ledger.attrs['name']}: {'; '.join(sources) or 'no matching value'}. "
              f"Values x100 as published (pub; ± the published standard deviation over training seeds), for "
              f"{STANDARD_TRAINING} training and the architecture named. Δ = this row minus published; in: "
              + ("yes/no, whether the published value lies in the row's 95% bootstrap interval" if "CI" in bases
                 else "")
              + (", or where the row has none, " if len(bases) == 2 else "")
              + (f"{'' if len(bases) == 2 else 'yes/no, whether the published value lies '}within the row's mean "
                 "± 1 standard deviation over checkpoints" if "sd" in bases else "")
              + ("" if bases else "no interval to place it in (--ci, or several checkpoints)" if compared
                 else "-, no row here is compared") + ".")
    return found, shown, legend, notes


def _cells(found: pd.DataFrame, index: int, shown: list[str]) -> list[str]:
    mine = found[found.row == index].to_dict("records")
    cells = []
    for metric in shown:
        record = next((r for r in mine if r["metric"] == metric), None)
        cells += ["-", "-"] if record is None else [_published_text(record), _delta_text(record)]
    return cells


@dataclass
class Block:
    """The published block below a table, for the renderers (`oodbench.report.render` for text
    and Markdown, `oodbench.report.latex`): per row of `rows` in order, its model, label,
    published architecture and cells (published, Δ and inside per metric of ``header``)."""
    header: list[str]
    lines: list[tuple[str, str, str, list[str]]]
    legend: str
    notes: list[str]


def reference_block(rows: pd.DataFrame, ledger: pd.DataFrame) -> Block:
    """The published block of `rows` (`oodbench.report.render.leaderboard_rows`) against `ledger`."""
    found, shown, legend, notes = reference_table(rows, ledger)
    full_spectrum = bool(rows.attrs.get("csid"))
    head = [name for metric in shown for name in (f"{header(metric, full_spectrum)} pub", "Δ, in")]
    lines = []
    for index, row in zip(rows.index, rows.to_dict("records")):
        lines.append((row["model"], row["label"], architecture_text(found[found.row == index].iloc[0].to_dict()),
                      _cells(found, index, shown)))
    return Block(head, lines, legend, notes)


def tidy_reference(tidy: pd.DataFrame, frame: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """`tidy` (`oodbench.report.tidy.leaderboard_tidy` of `frame`) with the published columns on
    the rows of a published metric: ``published``, ``published_std`` (fractions, as ``value``),
    ``published_architecture``, ``published_difference`` (value - published), ``published_inside``
    (yes/no, with ``ci_low``/``ci_high``), ``published_source`` and ``published_note`` (why the row
    is not compared, or how its data differ from the published benchmark's); empty on the other rows."""
    full_spectrum = bool(frame.attrs.get("csid"))
    found = comparisons(frame, ledger)
    metric_of = {m: ("fs_" if full_spectrum else "") + ("acc" if m == "acc" else m.split("_")[1]) for m in METRICS}
    dataset_of = {m: "id_test" if m == "acc" else AVERAGE[m.split("_")[0]] for m in METRICS}
    published = {}
    for record in found[found.metric != ""].to_dict("records"):
        cell = frame.loc[record["row"]]
        convention = frame.attrs["fpr"] if record["metric"].endswith("fpr95") else ""
        published[(cell["fingerprint"], dataset_of[record["metric"]], metric_of[record["metric"]], convention)] = record
    extra = {c: [] for c in ("published", "published_std", "published_architecture", "published_difference",
                             "published_inside", "published_source", "published_note")}
    for row in tidy.to_dict("records"):
        record = published.get((row["fingerprint"], row["dataset"], row["metric"], row["fpr_convention"]))
        if record is None:
            for column, values in extra.items():
                values.append("" if column in ("published_architecture", "published_inside", "published_source",
                                               "published_note") else np.nan)
            continue
        compared = not record["reason"]
        verdict = inside(record["published"], row.get("ci_low", np.nan), row.get("ci_high", np.nan), row["value"],
                         np.nan)[0] if compared else "-"
        extra["published"].append(record["published"] / 100)
        extra["published_std"].append(record["std"] / 100)
        extra["published_architecture"].append(record["architecture"])
        # to the table's precision (0.01 points x100): no float noise such as -0.0030000000000000027
        extra["published_difference"].append(round(row["value"] - record["published"] / 100, 4) if compared
                                             else np.nan)
        extra["published_inside"].append("" if verdict == "-" else verdict)
        extra["published_source"].append(record["source"])
        extra["published_note"].append(record["reason"] or (record["caveat"] if compared else ""))
    return tidy.assign(**extra)
