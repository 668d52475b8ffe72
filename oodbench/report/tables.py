"""What a leaderboard table holds, in words: the caption every format prints, and the compact
table's columns. Frames come from `oodbench.benchmark.leaderboard`; the renderers
(`oodbench.report.render`, `.latex`, `.tidy`, `.html`) turn them into text.
"""

from __future__ import annotations

import pandas as pd

from oodbench.benchmark.conventions import load_conventions
from oodbench.benchmark.leaderboard import FPR_CAPTION, FS


def transforms_note(frame: pd.DataFrame) -> str:
    """Which test transform the rows' images went through, and whose (the benchmark's, or a
    model's own: timm data config, torchvision weights, RobustBench); per model when they differ."""
    if "preprocessing" not in frame:
        return ""
    models: dict[str, list[str]] = {}
    for model, transform in zip(frame.model, frame.preprocessing):
        if transform and model not in models.setdefault(transform, []):
            models[transform].append(model)
    if len(models) == 1:
        return f" Test transform: {next(iter(models))}."
    if models:
        return " Test transforms: " + "; ".join(f"{t} for {', '.join(m)}" for t, m in models.items()) + "."
    return ""


def compact_columns(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The compact table's four (column, metric) pairs, the first its ranking: near- and
    far-OOD AUROC and FPR@95, FS-OOD ones for a full-spectrum benchmark (OpenOOD's layout)."""
    prefix = FS if frame.attrs.get("csid") else ""
    return [(prefix + column, metric) for column in ("near-OOD", "far-OOD") for metric in ("auroc", "fpr")]


def fpr_note(frame: pd.DataFrame) -> str:
    """Where the table's FPR@95 convention is not simply the one its cells were run under."""
    if frame.attrs.get("fpr_asked"):
        return ", as asked (--fpr), for every row, whichever convention its cells were run under"
    others = frame.attrs.get("fpr_others")
    if others:
        count = sum(others.values())
        return (f", the convention these cells were run under; {count} other cell(s) of this benchmark were run "
                "under the other one and are shown in a table of their own (--fpr shows every cell in one "
                "convention)")
    return ""


def caption(frame: pd.DataFrame, marks: str) -> str:
    """What a table holds, for every format: the metrics, the FPR@95 convention, how rows are
    marked (`marks`, the renderer's own words), checkpoints, intervals, missing sets, what was
    sampled and which data the rows come from."""
    groups = frame.attrs["groups"]
    missing = frame.attrs["missing"]
    members = {g: ", ".join(d for d in frame.attrs["datasets"] if groups.get(d) == g) or "none"
               for g in ("near", "far")}
    text = (f"{frame.attrs['benchmark']}: AUROC and FPR@95 (x100); near-OOD ({members['near']}) and far-OOD "
            f"({members['far']}) are unweighted means over their sets. {FPR_CAPTION[frame.attrs['fpr']]}"
            f"{fpr_note(frame)}. {marks}.")
    profiles = [load_conventions(name) for name in frame.attrs.get("conventions", [])]
    if len(profiles) == 1:
        text += " " + profiles[0].caption()
    elif profiles:
        text += (f" Rows of {len(profiles)} convention profiles, each row's named in its label: "
                 + "; ".join(f"{p.name} ({p.description})" for p in profiles) + ".")
    if frame.attrs.get("csid"):
        shifted = ", ".join(frame.attrs["csid"])
        text += (f" FS columns are full-spectrum OOD detection (OpenOOD v1.5's FS-OOD): the ID test set and the "
                 f"covariate-shifted ID sets ({shifted}) together count as ID; the plain columns compare the ID "
                 f"test set alone with each OOD set. FS ACC is the accuracy over the ID test and shifted sets "
                 f"together; the full tables (--wide) give the accuracy on each shifted set (ACC <set>).")
        if frame.attrs.get("csid_missing"):
            text += f" MISSING shifted ID sets: {', '.join(frame.attrs['csid_missing'])} (FS over those present)."
    counts = sorted(set(frame["checkpoints"])) if "checkpoints" in frame else []
    if frame.attrs.get("seeds"):
        text += (f" Mean ± standard deviation over seeds {', '.join(map(str, frame.attrs['seeds']))} (each seed its "
                 f"own class split and checkpoint; one seed: --benchmark {frame.attrs['benchmark']}_seed<N>).")
        if counts and counts[0] < len(frame.attrs["seeds"]):
            text += " A row with fewer finished seeds averages those it has."
    elif counts and counts[-1] > 1:
        many = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
        text += f" Mean ± standard deviation over {many} checkpoints per model (n per row in the full tables)."
    ci = frame.attrs.get("ci")
    if ci:
        text += (f" 95% bootstrap intervals: {ci['resamples']:,} resamples of the ID and OOD test images "
                 f"(paired across methods, seed {ci['seed']}), percentile.")
        if ci.get("without"):
            text += (f" {ci['without']} row(s) have no stored per-image scores (computed by an older oodbench): "
                     "no interval.")
    if missing:
        by_group = {g: [d for d in missing if groups.get(d) == g] for g in ("near", "far")}
        detail = "; ".join(f"{g}-OOD average over the sets present (missing: {', '.join(d)})"
                           for g, d in by_group.items() if d)
        text += f" MISSING datasets: {', '.join(missing)} — {detail}."
    text += transforms_note(frame)
    if any(name.startswith("pro_") for name in frame.get("postprocessor", [])):
        text += " PRO eps is in [0,1]-pixel units (normalisation happens inside the model)."
    text += f" Sampled: {frame.attrs['sampling']}." if frame.attrs.get("sampling") else " All test images used."
    fingerprints = frame.attrs.get("data_fingerprints", [])
    if len(fingerprints) == 1:
        text += f" Data fingerprint {fingerprints[0]}."
    elif fingerprints:
        text += (f" Rows from {len(fingerprints)} data fingerprints (runs of different data or definitions), "
                 f"the latest run's first: {', '.join(fingerprints)}.")
    if frame.attrs.get("hidden"):
        text += (f" {frame.attrs['hidden']} other result(s) of the same settings under other fingerprints are not "
                 "shown: each row is the latest on whole splits, or of a sampled run where no whole one exists "
                 "(leaderboard --all shows every stored version).")
    return text
