"""One generic registry, one instance per kind, and plugin discovery.

Built-ins register with a decorator when their module is imported. Heavy modules are
imported on first use through a ``name -> "module"`` table, so importing oodbench stays
cheap. Postprocessor plugins come from the entry-point group ``oodbench.postprocessors``
and from single files (``--plugin path.py``); a plugin that fails to import is reported
by name and does not break the others.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from oodbench.errors import OodbenchError, did_you_mean, require_file

T = TypeVar("T")

ENTRY_POINT_GROUP = "oodbench.postprocessors"


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    origin: str  # "builtin", "entry point <dist>", or "file <path>"


class Registry(Generic[T]):
    """Names -> objects of one kind. Duplicate names raise; unknown names suggest matches."""

    def __init__(self, kind: str, lazy_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._lazy_modules = lazy_modules
        self._loaded = False
        self._origin = "builtin"
        # names made on demand (a shaper+scorer composite): name -> object, None if not such a name
        self.resolver: Callable[[str], T | None] | None = None

    def register(self, *names: str) -> Callable[[T], T]:
        if not names:
            raise TypeError(f"register a {self.kind} with at least one name")

        def decorator(obj: T) -> T:
            for name in names:
                if name in self._entries and self._entries[name].obj is not obj:
                    raise OodbenchError(
                        f"{self.kind} '{name}' is already registered "
                        f"({self._entries[name].origin}); choose another name"
                    )
                self._entries[name] = Entry(name, obj, self._origin)
            if hasattr(obj, "name") or isinstance(obj, type):
                try:
                    obj.name = names[0]  # type: ignore[attr-defined]
                except (AttributeError, TypeError):
                    pass
            return obj

        return decorator

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._lazy_modules:
            importlib.import_module(module)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._ensure_loaded()
        made = self.resolver(name) if name not in self._entries and self.resolver is not None else None
        if made is not None:  # not listed among the registered names: `all` stays what was registered
            return Entry(name, made, "composed")
        if name not in self._entries:
            raise OodbenchError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"`oodbench list {self.kind}s` shows them all"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        self._ensure_loaded()
        seen: set[int] = set()
        for name in sorted(self._entries):
            entry = self._entries[name]
            if id(entry.obj) not in seen:
                seen.add(id(entry.obj))
                primary = getattr(entry.obj, "name", None)
                yield Entry(primary, entry.obj, entry.origin) if primary in self._entries else entry

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries or (self.resolver is not None and self._resolves(name))

    def _resolves(self, name: str) -> bool:
        try:
            return self.resolver(name) is not None
        except OodbenchError:
            return False

    def loading_from(self, origin: str) -> "_OriginScope":
        return _OriginScope(self, origin)


class _OriginScope:
    """Marks everything registered inside the block with a plugin origin."""

    def __init__(self, registry: Registry[Any], origin: str):
        self.registry, self.origin = registry, origin

    def __enter__(self) -> None:
        self.previous = self.registry._origin
        self.registry._origin = self.origin

    def __exit__(self, *exc: object) -> None:
        self.registry._origin = self.previous


POSTPROCESSORS: Registry[Any] = Registry(
    "postprocessor",
    lazy_modules=(
        "oodbench.postprocessors.softmax",
        "oodbench.postprocessors.calibrated",
        "oodbench.postprocessors.distance",
        "oodbench.postprocessors.subspace",
        "oodbench.postprocessors.shaping",
        "oodbench.postprocessors.gradnorm",
        "oodbench.postprocessors.pro",
        "oodbench.postprocessors.compose",
        "oodbench.postprocessors.odin",
        "oodbench.postprocessors.sni",
        "oodbench.postprocessors.latent",
        "oodbench.postprocessors.gram",
        "oodbench.postprocessors.mds_ensemble",
        "oodbench.postprocessors.rankfeat",
        "oodbench.postprocessors.iodin",
        "oodbench.postprocessors.adascale",
        "oodbench.postprocessors.ensemble",
        "oodbench.postprocessors.openmax",
        "oodbench.postprocessors.neighbours",
        "oodbench.postprocessors.prototypes",
        "oodbench.postprocessors.weiper",
        "oodbench.postprocessors.coverage",
        "oodbench.postprocessors.optfs",
        "oodbench.postprocessors.relative",
        "oodbench.postprocessors.neurons",
        "oodbench.postprocessors.transport",
    ),
)
MODELS: Registry[Any] = Registry("model", lazy_modules=(
    "oodbench.models.digits",
    "oodbench.models.cifar_resnet",
    "oodbench.models.openood",
    "oodbench.models.robustbench_source",
    "oodbench.models.timm_source",
    "oodbench.models.torch_source",
    "oodbench.models.torchvision_source",
))
DATASETS: Registry[Any] = Registry("dataset", lazy_modules=(
    "oodbench.datasets.builtin",
    "oodbench.datasets.imagelist",
    "oodbench.datasets.imagenet",
    "oodbench.datasets.cifar",
    "oodbench.datasets.corruptions",
    "oodbench.datasets.mnist",
    "oodbench.datasets.openset",
    "oodbench.datasets.svhn",
))
BENCHMARKS: Registry[Any] = Registry("benchmark", lazy_modules=("oodbench.datasets.benchmarks",))


def register_postprocessor(*names: str) -> Callable[[T], T]:
    """Decorator for a `Postprocessor` subclass: ``@register_postprocessor("ebo", "energy")``."""
    return POSTPROCESSORS.register(*names)


class PluginError(OodbenchError):
    pass


_loaded_plugins: dict[str, str | None] = {}


def load_plugin_file(path: str | Path) -> None:
    """Import a single-file plugin; its decorators register its postprocessors."""
    path = Path(path).expanduser().resolve()
    key = str(path)
    if key in _loaded_plugins:
        if _loaded_plugins[key]:
            raise PluginError(_loaded_plugins[key])
        return
    require_file(path, f"plugin file not found: {path}", "plugin file (.py)", PluginError)
    if path.suffix != ".py":
        raise PluginError(f"plugin {path} is not a Python file: --plugin takes a .py file that registers "
                          "postprocessors (an installed package registers through its entry points instead)")
    POSTPROCESSORS._ensure_loaded()
    # named by a stable digest of the path (not hash(), which differs per process): the module
    # name is part of its methods' fit-state and cell keys, which other processes must find
    module_name = f"oodbench_plugin_{path.stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        with POSTPROCESSORS.loading_from(f"file {path.name}"):
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    except Exception as exc:  # a plugin's own bug, reported by name
        sys.modules.pop(module_name, None)
        message = f"plugin {path.name} failed to import: {type(exc).__name__}: {exc}"
        _loaded_plugins[key] = message
        raise PluginError(message) from None
    _loaded_plugins[key] = None


_entry_point_failures: list[str] | None = None


def load_entry_point_plugins() -> list[str]:
    """Import every installed `oodbench.postprocessors` entry point, once per process (the
    scan reads the metadata of every installed distribution).
    Returns failure lines; they are warned the first time."""
    global _entry_point_failures
    if _entry_point_failures is not None:
        return list(_entry_point_failures)
    POSTPROCESSORS._ensure_loaded()
    failures = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in POSTPROCESSORS._entries:
            continue
        try:
            with POSTPROCESSORS.loading_from(f"entry point {dist}"):
                obj = ep.load()
                if ep.name not in POSTPROCESSORS._entries:
                    POSTPROCESSORS.register(ep.name)(obj)
        except Exception as exc:
            failures.append(
                f"plugin '{ep.name}' ({dist}) failed to import: {type(exc).__name__}: {exc}"
            )
    for line in failures:
        warnings.warn(line, stacklevel=2)
    _entry_point_failures = failures
    return list(failures)


def load_plugins(files: list[str] | tuple[str, ...] = (), strict: bool = True) -> list[str]:
    """Entry points, then files; each failure is one line naming the plugin.

    Every plugin is tried even when one fails. With `strict`, a failing file (one the user
    named) raises after the others loaded; otherwise its line is returned with the rest.
    """
    failures = load_entry_point_plugins()
    file_failures = []
    for path in files:
        try:
            load_plugin_file(path)
        except PluginError as exc:
            file_failures.append(str(exc))
    if strict and file_failures:
        raise PluginError("; ".join(file_failures))
    return failures + file_failures
