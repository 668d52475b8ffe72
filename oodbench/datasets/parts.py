"""Seeded stratified parts of a source: a benchmark split may be one part of a source (its
``parts`` give the part sizes as counts or fractions, one of which may be ``rest``), and a
``limit`` keeps a stratified subset of a split."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from oodbench.errors import OodbenchError


def describe_parts(parts: dict[str, Any]) -> str:
    """A split's ``parts`` in words: ``val 5,000, test the rest`` (fractions as percentages)."""
    return ", ".join(f"{name} " + ("the rest" if size == "rest" else f"{size:.0%}" if isinstance(size, float) and
                                   size <= 1 else f"{int(size):,}") for name, size in parts.items())


def stratified_parts(labels: np.ndarray, parts: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Split indices into named parts, stratified by label, deterministic given `seed`.

    Sizes are counts (int) or fractions (float <= 1) of the whole; one part may be
    ``rest``. Each class is spread over the parts in proportion (largest remainders).
    """
    labels = np.asarray(labels)
    n = labels.size
    sizes: dict[str, int] = {}
    rest = [k for k, v in parts.items() if v == "rest"]
    if len(rest) > 1:
        raise OodbenchError("only one part may be 'rest'")
    for key, value in parts.items():
        if value == "rest":
            continue
        sizes[key] = int(round(value * n)) if isinstance(value, float) and value <= 1 else int(value)
    taken = sum(sizes.values())
    if rest:
        sizes[rest[0]] = n - taken
    if taken > n or any(v < 0 for v in sizes.values()):
        raise OodbenchError(f"the parts ({describe_parts(parts)}) ask for more than the {n:,} images available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    # Walk the samples grouped by label (shuffled within each label) and hand each to the
    # part furthest behind its share: every part gets each class in proportion to its size.
    by_label = order[np.argsort(labels[order], kind="stable")]
    names = list(parts) + ["_unused"]
    choices = part_sequence(tuple(float(sizes[k]) for k in parts) + (float(n - sum(sizes.values())),), n)
    return {name: np.sort(by_label[choices == number]) for number, name in enumerate(names[:-1])}


@functools.lru_cache(maxsize=32)
def part_sequence(targets: tuple[float, ...], n: int) -> np.ndarray:
    """Which part each of `n` positions goes to: the part furthest behind its share
    (target x (position + 1) / n - filled; the first on ties; full parts never). It depends
    on the part sizes alone, so it is kept for the next split of the same sizes.

    Plain floats in a Python loop: the same float64 arithmetic, in the same order, as on
    NumPy arrays, at a fraction of the cost for the few parts of a split."""
    filled = [0.0] * len(targets)
    open_parts = [part for part, target in enumerate(targets) if target > 0]
    choices = np.empty(n, dtype=np.int64)
    for position in range(n):
        best, choice = -math.inf, 0
        for part in open_parts:
            behind = targets[part] * (position + 1) / n - filled[part]
            if behind > best:
                best, choice = behind, part
        choices[position] = choice
        filled[choice] += 1
        if filled[choice] >= targets[choice]:
            open_parts.remove(choice)
    choices.flags.writeable = False
    return choices
