"""What a run is made of, and the keys of everything it may reuse.

`Plan` resolves an experiment against its data root once: every split the run reads is
listed (once per dataset) and fingerprinted (`oodbench.identity`); each postprocessor gets
its setting, search space and the splits it reads; `cell_fingerprint` then names a cell
by its model's weights, its method's code and settings, and the fingerprints of exactly
the splits it reads — so a changed split recomputes exactly the cells that read it. The
runner and the readers of a finished run (`CachedExperiment`) build keys through it.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from oodbench.benchmark.config import ExperimentConfig
from oodbench.datasets.benchmarks import CONFIG_DIR, Benchmark, read_yaml
from oodbench.benchmark.conventions import DEFAULT as CONVENTIONS
from oodbench.benchmark.conventions import Conventions, load_conventions
from oodbench.datasets.base import DatasetRef, load_dataset, split_fingerprint_of
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError, did_you_mean
from oodbench.benchmark.reads import required_statistics
from oodbench.identity import LAYERS_VERSION, benchmark_fingerprint, cell_fingerprint, digest, output_key_text
from oodbench.file_state import FileState
from oodbench.postprocessors.base import Postprocessor
from oodbench.registry import POSTPROCESSORS

MISSING = "missing"
# Read by every run even when no method needs it: the operating point (`report`) sets its
# threshold on ID validation, and it is small.
ALWAYS = ("id:val",)


@dataclass
class SplitRef:
    """One dataset split of a benchmark: ``id:test``, ``ood_val:tin``, ``near:cifar100``..."""

    name: str
    ref: DatasetRef
    ood: bool


@dataclass
class SplitState:
    """A split as found under the data root: its fingerprint, or why it is missing."""

    fingerprint: str
    samples: int | None = None
    available: int | None = None  # before the limit
    reason: str | None = None
    origin: str = ""
    fallback: str = ""  # the any_of candidate read when it is not the first (the published list)

    @property
    def present(self) -> bool:
        return self.fingerprint != MISSING


def benchmark_splits(benchmark: Benchmark, fit_split: str, limit: int | None = None) -> dict[str, SplitRef]:
    """Every split of `benchmark` by name; ``id:fit`` is the ID split feature methods fit on
    (the same `SplitRef` as ``id:<fit_split>``). `limit`: at most that many images per split
    (a seeded stratified subset; a split's own smaller limit stays)."""

    def limited(ref: DatasetRef) -> DatasetRef:
        return ref if limit is None or (ref.limit or limit + 1) <= limit else replace(ref, limit=limit)

    splits: dict[str, SplitRef] = {}
    for name, ref in benchmark.id_splits.items():
        splits[f"id:{name}"] = SplitRef(f"id:{name}", limited(ref), ood=False)
    if fit_split in benchmark.id_splits:
        splits["id:fit"] = splits[f"id:{fit_split}"]
    for name, ref in benchmark.csid.items():
        splits[f"csid:{name}"] = SplitRef(f"csid:{name}", limited(ref), ood=False)
    for name, ref in benchmark.ood_val.items():
        splits[f"ood_val:{name}"] = SplitRef(f"ood_val:{name}", limited(ref), ood=True)
    for group, sets in (("near", benchmark.near), ("far", benchmark.far)):
        for name, ref in sets.items():
            splits[f"{group}:{name}"] = SplitRef(f"{group}:{name}", limited(ref), ood=True)
    return splits


def resolve_postprocessors(names: list[str], plugin_files: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The listed postprocessors (``all``: every registered one), then those registered by the
    run's plugin files (``--plugin``, ``plugins:``) that the list does not name, each method
    once: an alias of a method already listed (``energy`` after ``ebo``) is dropped."""
    if "all" in names:
        names = [entry.name for entry in POSTPROCESSORS.entries()]
    origins = {f"file {Path(path).name}" for path in plugin_files}
    names = list(names) + [entry.name for entry in POSTPROCESSORS.entries() if entry.origin in origins]
    seen, out = set(), []
    for name in names:
        cls = POSTPROCESSORS.get(name)  # unknown names fail here, with suggestions
        if cls not in seen:
            seen.add(cls)
            out.append(name)
    return out


def resolve_params(names: list[str], params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fixed hyperparameters per listed postprocessor (given under its name or an alias);
    parameters for a method that is not in the list are an error."""
    listed = {POSTPROCESSORS.get(name): name for name in names}
    resolved: dict[str, dict[str, Any]] = {}
    for key, values in params.items():
        if key not in POSTPROCESSORS or POSTPROCESSORS.get(key) not in listed:
            raise OodbenchError(f"params.{key}: '{key}' is not one of the postprocessors of this run"
                                f"{did_you_mean(key, names)}; listed: {', '.join(names)}")
        resolved[listed[POSTPROCESSORS.get(key)]] = dict(values)
    return resolved


def setting_of(search: bool, params: dict[str, Any], conventions: str = CONVENTIONS) -> str:
    """``search`` / ``default``, then ``@<profile>`` unless the default profile, then the fixed params."""
    base = ("search" if search else "default") + ("" if conventions == CONVENTIONS else f"@{conventions}")
    return base + (json.dumps(params, sort_keys=True) if params else "")


def search_space_for(name: str, cls: type[Postprocessor], conventions: Conventions | None = None
                     ) -> dict[str, list[Any]]:
    """The search lists of a postprocessor: its conventions profile's, else
    configs/postprocessors/<name>.yaml, else the class's; every value checked against the
    method's ranges."""
    if conventions is not None and (cls.name or name) in conventions.search:
        space = dict(conventions.search[cls.name or name])
        cls.check_search_space(space, source=f"the conventions profile '{conventions.name}'")
        return space
    path = CONFIG_DIR / "postprocessors" / f"{cls.name or name}.yaml"
    if path.is_file():
        stat = path.stat()
        space = json.loads(_listed_space(path, stat.st_mtime_ns, stat.st_size))  # a fresh copy per call
        cls.check_search_space(space, source=str(path))
        return space
    parts = getattr(cls, "search_parts", ())  # a composite searches its own lists and its parts'
    if parts:
        cls.check_search_space(cls.search_space, source=f"{cls.__name__}.search_space")
        parts_space = {k: v for part in parts
                       for k, v in search_space_for(part, POSTPROCESSORS.get(part), conventions).items()}
        return {**cls.search_space, **parts_space}
    cls.check_search_space(cls.search_space, source=f"{cls.__name__}.search_space")
    return dict(cls.search_space)


@functools.lru_cache(maxsize=None)
def _listed_space(path: Path, mtime_ns: int, size: int) -> str:
    """The search lists of configs/postprocessors/<name>.yaml, as JSON: read once per process
    while the file is unchanged (a run asks for each method's lists several times)."""
    raw = read_yaml(path, "postprocessor config") or {}
    space = raw.get("search", {}) if isinstance(raw, dict) else {}
    if not isinstance(space, dict) or not all(isinstance(v, list) and v for v in space.values()):
        raise OodbenchError(f"{path}: 'search' must map each hyperparameter to a non-empty list")
    return json.dumps(space)


@dataclass
class MethodPlan:
    """One postprocessor of a run: its fixed params, setting, search space and splits read."""

    name: str
    cls: type[Postprocessor]
    params: dict[str, Any]
    setting: str
    space: dict[str, list[Any]]
    splits: list[str] = field(default_factory=list)
    search_limit: int | None = None  # validation images per side an input-gradient search uses
    fit_split: str = "train"  # the ID split `fit` reads (the experiment's, or the profile's for this method)


@dataclass
class Plan:
    config: ExperimentConfig
    benchmark: Benchmark
    methods: dict[str, MethodPlan]
    splits: dict[str, SplitRef]
    states: dict[str, SplitState]
    token: str
    by_image: dict[ImageSpec, dict[str, SplitState]] = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(cls, config: ExperimentConfig, benchmark: Benchmark, names: list[str],
                every_split: bool = False) -> "Plan":
        """List and fingerprint every split the run's methods read (`every_split`: every split
        of the benchmark, for readers of a finished run); each source is listed once."""
        splits = benchmark_splits(benchmark, config.fit_split, config.limit)
        params = resolve_params(names, config.params)
        tests = ["id:test"] + [s for s in splits if s.split(":")[0] in ("csid", "near", "far")]
        ood_val = [s for s in splits if s.startswith("ood_val:")]
        conventions = load_conventions(config.conventions)
        methods = {}
        for name in names:
            method_cls = POSTPROCESSORS.get(name)
            fixed = params.get(name, {})
            space = search_space_for(name, method_cls, conventions) if config.search else {}
            space = {k: v for k, v in space.items() if k not in fixed}
            method_fit = conventions.fit_split.get(method_cls.name or name, config.fit_split)
            fit_split = f"id:{method_fit}"
            read = list(tests)
            if method_cls.needs_fit:
                read += [fit_split, "id:val"]
            if space and ood_val:
                read += ["id:val", *ood_val]
            read = [s for s in dict.fromkeys(read) if s in splits or s == fit_split]
            search_limit = config.search_limit if space and method_cls.needs_model else None
            defaults = conventions.method_params(method_cls.name or name, benchmark.name)
            methods[name] = MethodPlan(name, method_cls, {**defaults, **fixed},
                                       setting_of(config.search, fixed, conventions.name), space, read, search_limit,
                                       method_fit)
        token = uuid.uuid4().hex
        files = FileState(config.data_root, Path(config.cache_dir) / "state", verify=config.verify_data)
        states: dict[str, SplitState] = {}
        try:
            wanted = [s for m in methods.values() for s in m.splits] + [s for s in ALWAYS if s in splits]
            wanted += list(splits) if every_split else []
            for split in dict.fromkeys(wanted):
                if split not in splits:
                    states[split] = SplitState(MISSING, reason=f"the fit split '{config.fit_split}' is not in "
                                               f"{benchmark.name}; set fit_split: val to fit on ID validation")
                    continue
                states[split] = split_state(splits[split], config.data_root, benchmark.image, files, token)
        finally:
            files.close()
        return cls(config, benchmark, methods, splits, states, token)

    @property
    def fingerprint(self) -> str:
        """The benchmark as run here: its resolved definition and every split's fingerprint."""
        definition = {"image": self.benchmark.image.key(), "num_classes": self.benchmark.num_classes,
                      "splits": {name: [split.ref.payload(), split.ood] for name, split in self.splits.items()}}
        return benchmark_fingerprint(definition, {s: st.fingerprint for s, st in self.states.items()})

    def present(self, split: str) -> bool:
        return split in self.states and self.states[split].present

    def states_for(self, image: ImageSpec | None) -> dict[str, SplitState]:
        """The splits as a model with its own transform (`image`) reads them: the same files
        and selections, fingerprinted with that transform (None: the benchmark's)."""
        if image is None or image == self.benchmark.image:
            return self.states
        if image not in self.by_image:
            files = FileState(self.config.data_root, Path(self.config.cache_dir) / "state",
                              verify=self.config.verify_data)
            try:
                self.by_image[image] = {
                    split: split_state(self.splits[split], self.config.data_root, image, files, self.token)
                    if state.present else state for split, state in self.states.items()}
            finally:
                files.close()
        return self.by_image[image]

    def cell_fingerprint(self, name: str, model_identity: str, weights_hash: str,
                         image: ImageSpec | None = None) -> str:
        method = self.methods[name]
        states = self.states_for(image)
        # a method reading intermediate layers: its values also depend on the statistics' code
        layers = [stat.key for stat in required_statistics(method.cls, method.params, method.space)]
        reads = {"layer_statistics": [LAYERS_VERSION, *layers]} if layers else {}
        return cell_fingerprint(model_identity=model_identity, weights_hash=weights_hash, postprocessor=method.cls,
                                setting=method.setting, params=method.params,
                                search_space={**method.space, "search_limit": method.search_limit, **reads},
                                conventions=self.conventions.key(),
                                splits={s: states[s].fingerprint for s in method.splits})

    @property
    def conventions(self) -> Conventions:
        return load_conventions(self.config.conventions)

    def output_key(self, split: str, model_identity: str, weights_hash: str, image: ImageSpec | None = None) -> str:
        return output_key_text(model_identity, weights_hash, self.states_for(image)[split].fingerprint)

    def changed_splits(self, previous: dict[str, tuple[str, int | None, int | None]]) -> list[str]:
        """One line per split whose data differs from the last run of this benchmark in the store
        (split -> its fingerprint, samples and images available before a --limit then). When
        either run read a --limit sample of the split, the line says so: another sample, not
        a change the stored cells missed."""
        lines = []
        for split, state in self.states.items():
            if split not in previous or previous[split][0] == state.fingerprint:
                continue
            before, samples, available = previous[split]
            change = f"fingerprint {before[:8]} -> {state.fingerprint[:8]}"
            sampled = [n for n, of in ((samples, available), (state.samples, state.available))
                       if n is not None and of is not None and n < of]
            if sampled and samples != state.samples:
                then = _count(samples) + (f" of {available:,}" if available else "")
                lines.append(f"{split}: this run reads {_count(state.samples)} of its {_count(state.available)} "
                             f"images, the last run of {self.benchmark.name} in this store read {then} ({change}): "
                             "its cells are computed for these, the stored ones stay")
                continue
            counts = f"{_count(samples)} -> {_count(state.samples)} images"
            lines.append(f"{split} changed since the last run of {self.benchmark.name} in this store ({counts}, "
                         f"{change}): the cells that read it are recomputed")
        return lines


def _count(samples: int | None) -> str:
    return "missing" if samples is None else f"{samples:,}"


def split_state(split: SplitRef, data_root: str, image: ImageSpec, files: FileState, token: str | None) -> SplitState:
    """List one split (reusing the run's listing of its source) and fingerprint it."""
    try:
        dataset = load_dataset(split.ref, data_root, image, ood=split.ood, memo=token)
    except DatasetMissing as exc:
        return SplitState(MISSING, reason=str(exc))
    fingerprint = split_fingerprint_of(dataset, split.ref, split.ood, files)
    return SplitState(fingerprint, samples=len(dataset), available=getattr(dataset.base, "available", len(dataset)),
                      origin=getattr(dataset.base, "origin", ""), fallback=fallback_of(dataset))


def fallback_of(dataset) -> str:
    """The fallback candidate a split reads (`oodbench.datasets.imagelist.any_of`), through its
    subset wrappers; '' for a first choice."""
    while dataset is not None:
        if getattr(dataset, "fallback", ""):
            return dataset.fallback
        dataset = getattr(dataset, "base", None)
    return ""


def model_placeholder(spec) -> str:
    """An identity for a model that could not be loaded (its cells are stored as failed)."""
    return "unloadable:" + digest([spec.name, spec.checkpoint, spec.options])


def check_compatible(display: str, probe: dict[str, Any], benchmark: Benchmark) -> None:
    """Refuse, in one line, a model whose classes or input shape do not fit the benchmark."""
    image = benchmark.image.for_model(probe.get("preprocessing"))
    shape = f"{image.channels}x{image.size}x{image.size}"
    where = f"model '{display}' does not fit benchmark '{benchmark.name}'"
    if probe["num_classes"] != benchmark.num_classes:
        raise OodbenchError(f"{where}: the model has {probe['num_classes']} classes, the benchmark "
                            f"{benchmark.num_classes}")
    if probe["forward_error"]:
        raise OodbenchError(f"{where}: one image of the benchmark's shape ({shape}) fails in the model's forward "
                            f"pass ({probe['forward_error']})")
    if probe["output_classes"] != benchmark.num_classes:
        raise OodbenchError(f"{where}: on a {shape} image it outputs {probe['output_classes']} values, the "
                            f"benchmark has {benchmark.num_classes} classes")
