"""Fitting through the fit-state cache: a postprocessor fits once per (method, its fit
parameters, the outputs it fits on), and every later job loads the state instead of reading
the fit split (`oodbench.storage.caches.FitStateCache`). State attributes that are views of
the memory-mapped fit outputs (``fit_views``) are not stored: they are mapped again on load.
Jobs that need one state at once (Ray tasks, two models with the same weights) fit it once.
"""

from __future__ import annotations

from typing import Callable

from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.storage.caches import FitStateCache


def fit_cached(method: Postprocessor, fit: Outputs | Callable[[], Outputs] | None, val: Outputs | None,
               fit_cache: FitStateCache | None, output_keys: list[str]) -> None:
    """`method.fit(fit, val)`, or its state from the fit-state cache when it was fitted before.
    `fit` may be a function reading the fit split: it is called only when the method fits, or
    when its cached state views the fit outputs (``method.fit_views``: mapped, not copied)."""
    if not method.needs_fit:
        return
    key = FitStateCache.key(method, output_keys) if fit_cache is not None and method.cache_fit else None
    if key is None:
        method.fit(fit() if callable(fit) else fit, val)
        return
    with fit_cache.computing(key):  # jobs needing this state at once fit it once
        if restore_fit_state(method, fit_cache, key, fit):
            return
        method.fit(fit() if callable(fit) else fit, val)
        store_fit_state(method, fit_cache, key)



def store_fit_state(method: Postprocessor, fit_cache: FitStateCache, key: str) -> bool:
    """Cache what `method.fit` set, less its views of the fit outputs (``fit_views``); False
    when the state is not tensors and plain values (not stored)."""
    return fit_cache.save(key, {name: value for name, value in method.fit_state().items()
                                if name not in method.fit_views})



def restore_fit_state(method: Postprocessor, fit_cache: FitStateCache, key: str,
                      fit: Outputs | Callable[[], Outputs] | None) -> bool:
    """Load a cached fit state into `method`, its ``fit_views`` pointed at the fit outputs
    again (`fit` is read only then); False when none is cached under `key`."""
    state = fit_cache.load(key)
    if state is None:
        return False
    if method.fit_views:
        outputs = fit() if callable(fit) else fit
        state.update({name: getattr(outputs, field) for name, field in method.fit_views.items()})
    method.load_fit_state(state)
    return True
