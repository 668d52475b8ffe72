"""The leaderboard of `oodbench leaderboard` and `oodbench reproduce`, from the results store alone.

- `stored_benchmarks`: which benchmarks a ``--benchmark`` name means: itself, every stored one,
  or a seed family's ``<name>_seed<N>`` benchmarks (then averaged);
- `leaderboard_text`: one table per benchmark and FPR@95 convention (text, Markdown, LaTeX;
  seed families as mean ± std), one tidy table of every number (CSV, JSON) or the HTML page,
  with a published ledger's column when one is named;
- `reproduction_tables`: the tables of `oodbench reproduce`: the cells of a release's models
  under its convention profile, beside its published values when oodbench ships its ledger.
"""

from __future__ import annotations

from typing import Iterator

import pandas as pd

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.report.ledger import available, load_ledger
from oodbench.report.reference import tidy_reference
from oodbench.report.render import render_leaderboard
from oodbench.report.seeds import average_frames, averaged_tidy, mixed_fpr, seed_families
from oodbench.storage.store import ResultStore
from oodbench.benchmark.leaderboard import leaderboard_frames
from oodbench.report.tidy import CLEAN_ATTACK, leaderboard_tidy, render_tidy


def stored_benchmarks(store: ResultStore, name: str | None = None,
                      average_seeds: bool = False) -> tuple[list[str], bool]:
    """The benchmarks `name` means in `store` (None: every stored one; a seed family's name, e.g.
    ``osr_mnist6``: its ``<name>_seed<N>`` benchmarks) and whether their seeds are averaged
    (`average_seeds`, or a family's name). Raises OodbenchError when the store holds nothing."""
    stored = sorted(set(store.frame("cells").benchmark))
    family = seed_families(stored).get(name) if name not in stored else None
    benchmarks = family or ([name] if name else stored)
    if not benchmarks:
        raise OodbenchError(f"results store {store.path} holds no results yet")
    return benchmarks, average_seeds or bool(family)


def leaderboard_text(store: ResultStore, benchmarks: list[str], average: bool = False, *,
                     models: list[str] | None = None, postprocessors: list[str] | None = None,
                     fpr: str | None = None, conventions: str | None = None, fingerprint: str | None = None,
                     every: bool = False, fmt: str = "text", wide: bool = False, show_params: bool = False,
                     resamples: int | None = None, ci_seed: int = 0,
                     reference: str | None = None, page: str | None = None) -> tuple[str, list[pd.DataFrame]]:
    """The leaderboard of `benchmarks` in `store` as `fmt` (text, markdown, latex: one table per
    benchmark and FPR@95 convention, seed families folded when `average`; csv, json: one tidy
    table; html: one self-contained page written to `page`, by default beside the store, and a
    line naming it), and the leaderboard frames it shows. The filters are those of `leaderboard_frames`;
    `resamples` (None: none) bootstrap intervals with `ci_seed`; `reference` a ledger name
    (`oodbench.report.ledger`). Raises OodbenchError (one line) for an unknown ledger, a
    filter that matches nothing (naming what the store has) and seeds of one family run under
    different FPR@95 conventions with `fpr` unset."""
    ledger = load_ledger(reference) if reference else None  # a broken ledger fails before any table is built
    unknown = _unknown_names(store, benchmarks, models, postprocessors)
    if unknown:  # a typo among several names is never a silently shorter table
        raise OodbenchError(unknown)
    frames = []
    for benchmark in benchmarks:
        found = leaderboard_frames(store, benchmark, models, postprocessors, fpr=fpr, fingerprint=fingerprint,
                                   every=every, conventions=conventions)
        if found[0].empty:
            raise OodbenchError(_no_results(store, benchmark, models, postprocessors, fingerprint, conventions))
        frames += found
    mixed = mixed_fpr(frames) if average else []
    if mixed:
        raise OodbenchError(f"the seeds of {', '.join(mixed)} were run under different FPR@95 conventions; "
                            "average them in one with --fpr classic or --fpr openood")
    if fmt in ("csv", "json"):  # one tidy table, whatever the number of benchmarks
        tidies = [leaderboard_tidy(f, store, resamples, ci_seed) for f in frames]
        if ledger is not None:
            tidies = [tidy_reference(t, f, ledger) for t, f in zip(tidies, frames)]
        tidy = pd.concat(tidies)
        if average:
            seeded = tidy.benchmark.isin([n for names in seed_families(benchmarks).values() for n in names])
            tidy = pd.concat([tidy[~seeded].assign(std=float("nan"), seeds=""),
                              averaged_tidy(tidy[seeded]).assign(**CLEAN_ATTACK)])
        return render_tidy(tidy, fmt), frames
    frames = average_frames(frames) if average else frames
    if fmt == "html":  # jinja2 is imported for the page alone
        from oodbench.report.html import write_page

        return f"report page: {write_page(frames, store, page, resamples, ci_seed, reference)}", frames
    return "\n\n".join(render_leaderboard(f, fmt, wide, show_params, store, resamples, ci_seed, reference)
                       for f in frames), frames


def _unknown_names(store: ResultStore, benchmarks: list[str], models: list[str] | None,
                   postprocessors: list[str] | None) -> str | None:
    """The first model or postprocessor asked for that has no results in any of `benchmarks`
    (with what the store has), or None."""
    cells = store.frame("cells")
    cells = cells[cells.benchmark.isin(benchmarks)]
    where = f"benchmark '{benchmarks[0]}'" if len(benchmarks) == 1 else f"benchmarks {', '.join(benchmarks)}"
    for option, asked_for in (("model", models), ("postprocessor", postprocessors)):
        asked = [name for name in asked_for or [] if name not in set(cells[option])]
        if asked:
            have = sorted(set(cells[option]))
            return (f"no results for {option} '{asked[0]}'{did_you_mean(asked[0], have)} in {where} "
                    f"of {store.path}; it has results for: {', '.join(have)}")
    return None


def _no_results(store: ResultStore, benchmark: str, models: list[str] | None, postprocessors: list[str] | None,
                fingerprint: str | None, conventions: str | None) -> str:
    """Why a leaderboard is empty: the model or postprocessor asked for has no results (and which
    have), else the fingerprint or convention filter matched nothing."""
    unknown = _unknown_names(store, [benchmark], models, postprocessors)
    if unknown:
        return unknown
    which = f" with fingerprint {fingerprint}" if fingerprint else ""
    which += f" under conventions '{conventions}'" if conventions else ""
    return f"no results for benchmark '{benchmark}'{which} in {store.path}"


def reproduction_tables(store: ResultStore, release: str, conventions: str, benchmarks: list[str],
                        models: list[str], fmt: str = "text") -> Iterator[str]:
    """Per table of a reproduction (`benchmarks` run, seed families folded into one): the
    leaderboard of `models` under `conventions`, with `release`'s published values beside it
    when oodbench ships its ledger (``configs/reference/<release>.csv``)."""
    reference = release if release in available() else None
    for name in sorted(seed_families(benchmarks)) if len(benchmarks) > 1 else benchmarks:
        found, average = stored_benchmarks(store, name)
        yield leaderboard_text(store, found, average, models=models, conventions=conventions, fmt=fmt,
                               reference=reference)[0]
