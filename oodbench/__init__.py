"""oodbench: out-of-distribution detection benchmarks for image classifiers.

The public face is small: the plugin API (`Postprocessor`, `Outputs`,
`register_postprocessor`), a few entry points (`list_postprocessors`,
`create_postprocessor`, `run`), and the Python API for a live model and in-memory data
(`evaluate`, `calibration`, `operating_point`, `detector`, `load_detector`, `Model`;
`oodbench.api`). Everything else is plumbing. Importing the package is
cheap: torch and the rest load when one of these names is first used.
"""

from __future__ import annotations

import importlib

from oodbench.version import __version__

_LAZY = {
    "OodbenchError": "oodbench.errors",
    "Outputs": "oodbench.outputs",
    "Postprocessor": "oodbench.postprocessors.base",
    "register_postprocessor": "oodbench.registry",
    "Model": "oodbench.api",
    "Detector": "oodbench.api",
    "evaluate": "oodbench.api",
    "calibration": "oodbench.api",
    "operating_point": "oodbench.api",
    "detector": "oodbench.api",
    "load_detector": "oodbench.api",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oodbench' has no attribute '{name}'")


def list_postprocessors() -> list[str]:
    """Names of every registered postprocessor (built-ins and installed plugins)."""
    from oodbench.registry import POSTPROCESSORS, load_entry_point_plugins

    load_entry_point_plugins()
    return POSTPROCESSORS.names()


def create_postprocessor(name: str, **params):
    """A postprocessor by registered name, with hyperparameters overriding its defaults."""
    from oodbench.registry import POSTPROCESSORS, load_entry_point_plugins

    load_entry_point_plugins()
    return POSTPROCESSORS.get(name)(**params)


def run(config, **overrides):
    """Run an experiment (a YAML path or a dict) and return its leaderboard DataFrame."""
    from oodbench.benchmark.runner import run_experiment

    return run_experiment(config, **overrides)


__all__ = [
    "Detector",
    "Model",
    "OodbenchError",
    "Outputs",
    "Postprocessor",
    "create_postprocessor",
    "list_postprocessors",
    "register_postprocessor",
    "run",
    "calibration",
    "detector",
    "evaluate",
    "load_detector",
    "operating_point",
    "__version__",
]
