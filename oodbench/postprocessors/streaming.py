"""Fit statistics over a fit split of any size, a block of rows at a time.

A fit split's outputs are memory-mapped from the output cache (`oodbench.storage.entries`),
so a fit that reads them in blocks holds one block, whatever the split's size:

- `column_mean`: the mean of each column, accumulated in float64;
- `percentile` and `quantiles`: NumPy's ``np.percentile(values, p)`` and ``np.quantile``
  (their default linear interpolation)
  over every value of a float32 tensor, exactly, without a copy of the values: two passes
  of a radix selection (a histogram of the top 16 bits of each value's order-preserving
  key, then of the low 16 bits within the one or two bins that hold the wanted ranks)
  find the two order statistics NumPy interpolates between, and the interpolation repeats
  NumPy's arithmetic (Hyndman & Fan's method 7; ``numpy/lib/_function_base_impl.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK_VALUES = 1 << 22  # values per block: ~16 MiB of float32, plus their keys
BINS = 1 << 16


def row_blocks(tensor: torch.Tensor, values: int = BLOCK_VALUES):
    """Consecutive row blocks of `tensor` of about `values` elements each (one row at least)."""
    per_row = max(math.prod(tensor.shape[1:]), 1)
    rows = max(values // per_row, 1)
    for start in range(0, tensor.shape[0], rows):
        yield tensor[start:start + rows]


def column_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over rows of an N x ... tensor, in float64, summed block by block (a float64
    copy of the whole tensor never exists). Equal to ``tensor.double().mean(dim=0)`` up to
    the order of the float64 additions (relative error ~1e-15)."""
    total = torch.zeros(tensor.shape[1:], dtype=torch.float64)
    for block in row_blocks(tensor):
        total += block.double().sum(dim=0)
    return total / tensor.shape[0]


def _keys(block: np.ndarray) -> np.ndarray:
    """uint32 keys that sort as the float32 values do (-0.0 taken as +0.0, as NumPy compares them)."""
    bits = (block.astype(np.float32, copy=False) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def _value(key: int) -> np.float32:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _flat_blocks(values: torch.Tensor):
    for block in row_blocks(values.detach().cpu()):
        yield block.contiguous().reshape(-1).numpy()


def order_statistics(values: torch.Tensor, ranks: list[int]) -> tuple[list[np.float32], bool]:
    """The values at 0-based `ranks` of all of `values` sorted (float32), and whether any is NaN."""
    high = np.zeros(BINS, dtype=np.int64)
    for block in _flat_blocks(values):
        if np.isnan(block).any():
            return [], True
        high += np.bincount(_keys(block) >> 16, minlength=BINS)
    below = np.cumsum(high) - high  # values in lower bins
    bins = {rank: int(np.searchsorted(np.cumsum(high), rank, side="right")) for rank in ranks}
    low = {b: np.zeros(BINS, dtype=np.int64) for b in set(bins.values())}
    for block in _flat_blocks(values):
        keys = _keys(block)
        top = keys >> 16
        for b, counts in low.items():
            counts += np.bincount(keys[top == b] & 0xFFFF, minlength=BINS)
    found = []
    for rank in ranks:
        b = bins[rank]
        within = int(np.searchsorted(np.cumsum(low[b]), rank - below[b], side="right"))
        found.append(_value((b << 16) | within))
    return found, False


def percentile(values: torch.Tensor, p: float) -> float:
    """``float(np.percentile(values.numpy().ravel(), p))``, bit for bit, for a float32 tensor
    of any size read block by block (other dtypes: NumPy itself, on a copy)."""
    return percentiles(values, [p])[0]


def percentiles(values: torch.Tensor, ps: list[float]) -> list[float]:
    """`percentile` of each of `ps`, all from the same two passes over the values."""
    return quantiles(values, [np.true_divide(p, 100) for p in ps])  # as np.percentile calls np.quantile


def quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """``float(np.quantile(values.numpy().ravel(), q))`` for each q of `qs` (fractions), bit
    for bit, for a float32 tensor of any size, from the same two passes over the values."""
    if values.dtype != torch.float32 or values.numel() == 0:
        return [float(np.quantile(values.detach().cpu().numpy().ravel(), q)) for q in qs]
    n = values.numel()
    plans = []
    for q in qs:
        virtual = (n - 1) * q  # NumPy's float64 virtual index, clamped as it does
        previous = np.floor(virtual)
        following = previous + 1
        if virtual >= n - 1:
            previous = following = -1
        elif virtual < 0:
            previous = following = 0
        plans.append((float(np.asanyarray(virtual - previous)), int(previous) % n, int(following) % n))
    ranks = sorted({rank for _, *pair in plans for rank in pair})
    found, nan = order_statistics(values, ranks)
    if nan:
        return [math.nan] * len(qs)
    of = dict(zip(ranks, found))
    results = []
    for gamma, first, second in plans:
        a, b = of[first], of[second]
        difference = b - a  # NumPy's _lerp, on float32 scalars with a Python float weight
        result = np.add(a, difference * gamma)
        if gamma >= 0.5:
            result = np.subtract(b, difference * (1 - gamma), dtype=result.dtype)
        results.append(float(result))
    return results
