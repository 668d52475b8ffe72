"""The experiment config: one YAML file naming a benchmark, models and postprocessors.

Unknown keys are errors with the close match, never silently ignored. Command-line
overrides (``--data-root``, ``--results``...) and the ``OODBENCH_DATA`` /
``OODBENCH_CACHE`` environment variables take precedence over the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from oodbench.datasets.benchmarks import read_yaml
from oodbench.benchmark.conventions import DEFAULT as DEFAULT_CONVENTIONS
from oodbench.benchmark.conventions import load_conventions
from oodbench.datasets.base import check_limit
from oodbench.errors import OodbenchError, did_you_mean, require_folder
from oodbench.models.adapter import ModelSpec
from oodbench.registry import MODELS

FPR_CONVENTIONS = ("classic", "openood")
FIT_SPLITS = ("train", "val")


@dataclass
class ExperimentConfig:
    benchmark: str
    models: list[ModelSpec]
    postprocessors: list[str]
    data_root: str = "./data"
    search: bool = True
    fit_split: str = "train"
    fpr: str | None = None  # None: the conventions profile's (load_config resolves it)
    conventions: str = "paper"
    plugins: list[str] = field(default_factory=list)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: str = "results/oodbench.sqlite"
    cache_dir: str = ".oodbench_cache"
    device: str = "cpu"
    batch_size: int = 256
    num_workers: int = 0
    trust_checkpoint: bool = False
    verify_data: bool = False
    limit: int | None = None
    search_limit: int = 1000
    threads: int | None = None  # torch intra-op threads of the run; None: `default_threads()`
    attack: dict[str, Any] | None = None  # the threat model of `oodbench attack` (`oodbench.tasks.attacks.spec`)
    name: str = ""
    source: str = ""

    @property
    def digest(self) -> str:
        """Hash of what determines the numbers (not where files go)."""
        payload = {
            "benchmark": self.benchmark,
            "models": [vars(m) for m in self.models],
            "postprocessors": self.postprocessors,
            "search": self.search,
            "fit_split": self.fit_split,
            "params": self.params,
            "limit": self.limit,
            "search_limit": self.search_limit,
        }
        if self.conventions != DEFAULT_CONVENTIONS:  # the default leaves old digests as they were
            payload["conventions"] = self.conventions
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


KEYS = {
    "benchmark": str, "models": list, "postprocessors": (list, str), "data_root": str,
    "search": bool, "fit_split": str, "fpr": str, "plugins": list, "params": dict,
    "results": str, "cache_dir": str, "device": str, "batch_size": int, "num_workers": int,
    "trust_checkpoint": bool, "verify_data": bool, "limit": int, "search_limit": int, "name": str,
    "threads": int, "conventions": str, "attack": dict,
}


def _check_type(where: str, key: str, value: Any, expected: Any) -> None:
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected_types:
        ok = False
    else:
        ok = isinstance(value, expected_types)
    if not ok:
        names = " or ".join(t.__name__ for t in expected_types)
        raise OodbenchError(f"{where}: '{key}' must be a {names}, got {type(value).__name__} {value!r}")


def parse_config(raw: Any, source: str = "<config>") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise OodbenchError(f"{source}: an experiment config is a YAML mapping of keys")
    for key, value in raw.items():
        if key not in KEYS:
            raise OodbenchError(f"{source}: unknown key '{key}'{did_you_mean(str(key), KEYS)}")
        _check_type(source, key, value, KEYS[key])
    for key in ("benchmark", "models", "postprocessors"):
        if key not in raw:
            raise OodbenchError(f"{source}: missing key '{key}'")
    models = [spec for i, entry in enumerate(raw["models"]) for spec in _parse_model(entry, f"{source}: models[{i}]")]
    if not models:
        raise OodbenchError(f"{source}: 'models' is empty")
    labels = [m.display for m in models]
    if len(set(labels)) != len(labels):
        raise OodbenchError(f"{source}: two models share the name/label '{_first_duplicate(labels)}'; give one a 'label'")
    postprocessors = raw["postprocessors"]
    if isinstance(postprocessors, str):
        postprocessors = [postprocessors]
    if not postprocessors:
        raise OodbenchError(f"{source}: 'postprocessors' is empty")
    config = ExperimentConfig(
        benchmark=raw["benchmark"], models=models, postprocessors=[str(p) for p in postprocessors],
        source=source, **{k: v for k, v in raw.items() if k not in ("benchmark", "models", "postprocessors")},
    )
    if config.fpr is not None and config.fpr not in FPR_CONVENTIONS:
        raise OodbenchError(f"{source}: 'fpr' must be one of {', '.join(FPR_CONVENTIONS)}")
    load_conventions(config.conventions)  # an unknown profile fails here, with the close matches
    if config.fit_split not in FIT_SPLITS:
        raise OodbenchError(f"{source}: 'fit_split' must be one of {', '.join(FIT_SPLITS)}")
    if config.batch_size < 1:
        raise OodbenchError(f"{source}: 'batch_size' must be positive")
    if config.num_workers < 0:
        raise OodbenchError(f"{source}: 'num_workers' must be 0 (decode in the main process) or more")
    check_limit(config.limit, f"{source}: 'limit'")
    check_threads(config.threads, f"{source}: 'threads'")
    check_limit(config.search_limit, f"{source}: 'search_limit'")
    for name, params in config.params.items():
        if not isinstance(params, dict):
            raise OodbenchError(f"{source}: params.{name} must map hyperparameters to values")
    if source not in ("<config>",) and Path(source).exists():
        base = Path(source).resolve().parent
        config.plugins = [str(_relative_to(base, p)) for p in config.plugins]
    return config


def check_threads(value: Any, what: str) -> int | None:
    """A thread count: None (the default rule) or a positive integer (one error line otherwise)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise OodbenchError(f"{what} must be a positive number of threads, got {value!r}")
    return value


def _first_duplicate(items: list[str]) -> str:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return ""


def _relative_to(base: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base / candidate if (base / candidate).exists() else candidate


def _parse_model(entry: Any, where: str) -> list[ModelSpec]:
    """One model entry; an entry with ``checkpoints: [...]`` is one model per checkpoint."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise OodbenchError(f"{where}: a model is a name or a mapping with 'name'")
    for key in entry:
        if key not in ModelSpec.KEYS:
            raise OodbenchError(f"{where}: unknown key '{key}'{did_you_mean(str(key), ModelSpec.KEYS)}")
    tags = entry.get("tags") or []
    if not isinstance(tags, list):
        raise OodbenchError(f"{where}: 'tags' must be a list")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise OodbenchError(f"{where}: 'options' must be a mapping")
    common = dict(name=str(entry["name"]), tags=[str(t) for t in tags], options=options, label=entry.get("label"))
    if "checkpoints" not in entry:
        seeds = [] if "checkpoint" in entry or "seed" in options else _released_seeds(common["name"])
        if seeds:  # an official release with training seeds: one model per seed
            return [ModelSpec(member=seed, **{**common, "options": {**options, "seed": seed}}) for seed in seeds]
        return [ModelSpec(checkpoint=entry.get("checkpoint"), **common)]
    checkpoints = entry["checkpoints"]
    if "checkpoint" in entry:
        raise OodbenchError(f"{where}: give 'checkpoint' (one file) or 'checkpoints' (several), not both")
    if not isinstance(checkpoints, list) or not checkpoints or not all(isinstance(c, str) and c for c in checkpoints):
        raise OodbenchError(f"{where}: 'checkpoints' must be a non-empty list of checkpoint files")
    normalised = [str(PurePath(c)) for c in checkpoints]
    if len(set(normalised)) != len(normalised):
        raise OodbenchError(f"{where}: checkpoint '{_first_duplicate(normalised)}' is listed twice")
    return [ModelSpec(checkpoint=path, member=member, **common)
            for path, member in zip(checkpoints, checkpoint_names(normalised))]


def _released_seeds(name: str) -> list[str]:
    """The seeds a source releases for `name` (OpenOOD's s0, s1, s2), [] when it names none."""
    if ":" not in name:
        return []
    source, model = name.split(":", 1)
    members = getattr(MODELS.get(source), "members", None) if source in MODELS else None
    return members(model) if members else []


def checkpoint_names(paths: list[str]) -> list[str]:
    """Short distinct names for the checkpoints of one model: the file stems (s0, s1, s2); when
    those repeat (OpenOOD's s0/best.ckpt, s1/best.ckpt), the last folder that tells them apart."""
    stems = [PurePath(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    parts = [PurePath(p).parts for p in paths]
    shared = 0  # trailing path parts every checkpoint has in common
    while all(len(p) > shared + 1 for p in parts) and len({p[-1 - shared] for p in parts}) == 1:
        shared += 1
    names = [p[-1 - shared] for p in parts]
    return names if len(set(names)) == len(names) else list(paths)


DATA_ROOT_OPTIONS = "set by --data-root, OODBENCH_DATA or the config's data_root"
CACHE_OPTIONS = "set by --cache-dir, OODBENCH_CACHE or the config's cache_dir"


def load_config(path_or_dict: str | Path | dict, **overrides: Any) -> ExperimentConfig:
    """Read and validate a config, then apply non-None overrides and environment defaults."""
    if isinstance(path_or_dict, dict):
        config = parse_config(path_or_dict)
    else:
        path = Path(path_or_dict).expanduser()
        config = parse_config(read_yaml(path, "config file"), str(path))
    if "OODBENCH_DATA" in os.environ and overrides.get("data_root") is None:
        config.data_root = os.environ["OODBENCH_DATA"]
    if "OODBENCH_CACHE" in os.environ and overrides.get("cache_dir") is None:
        config.cache_dir = os.environ["OODBENCH_CACHE"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "models":
            config.models = select_models(config, value)
        elif key == "postprocessors":
            config.postprocessors = list(value)
        elif key == "limit":
            config.limit = check_limit(value, "--limit")
        elif key == "threads":
            config.threads = check_threads(value, "--threads")
        elif key == "batch_size" and (isinstance(value, bool) or value < 1):
            raise OodbenchError(f"--batch-size must be a positive number of images, got {value}")
        elif key == "num_workers" and (isinstance(value, bool) or value < 0):
            raise OodbenchError(f"--num-workers must be 0 or a positive number of processes, got {value}")
        elif key == "plugins":
            config.plugins = list(config.plugins) + list(value)
        elif not hasattr(config, key):
            raise TypeError(f"unknown override {key}")
        else:
            setattr(config, key, value)
    require_folder(config.data_root, "data root", DATA_ROOT_OPTIONS)
    require_folder(config.cache_dir, "cache folder", CACHE_OPTIONS)
    conventions = load_conventions(config.conventions)
    if config.fpr is None:
        config.fpr = conventions.fpr
    return config


def select_models(config: ExperimentConfig, names: list[str]) -> list[ModelSpec]:
    """The config's models named (by label or name) in `names`, in the config's order."""
    known = {m.display for m in config.models} | {m.name for m in config.models} | {m.model_label for m in config.models}
    for name in names:
        if name not in known:
            raise OodbenchError(f"--models: '{name}' is not a model of {config.source}{did_you_mean(name, known)}; "
                                f"its models: {', '.join(m.display for m in config.models)}")
    return [m for m in config.models if {m.display, m.name, m.model_label} & set(names)]
