"""Benchmark definitions: ID splits, the OOD validation set, near- and far-OOD test sets.

A benchmark is a YAML file (``configs/benchmarks/<name>.yaml`` are registered by name;
any other path works too) with a ``version`` that is stored with every result. ``image``
is the benchmark's test transform (`ImageSpec`): ``{size, channels}``, optionally
``resize`` (the short side before the center crop, e.g. 256 for 224) and ``interpolation``;
models that say how their inputs are prepared use their own instead. Dataset
definitions reused in several places go under ``definitions:`` as YAML anchors.

The ID test split may name ``holdout_classes: [c, ...]``: ID classes held out as
pseudo-novel. Their test samples stay in the split; the operating-point report counts
them as unseen (a deployed detector should call them novel) and reports the seen and
unseen accuracy (`oodbench.tasks.operating_point`). Keep them out of the training
and validation data (the dataset's ``classes`` option) so that they really are unseen.

``csid:`` (optional) names covariate-shifted copies of the ID test set (CIFAR-10-C,
ImageNet-C/-R/-V2...): a full-spectrum (FS-OOD) benchmark. Each is scored like the ID
test set and counted as ID: besides the plain metrics (ID test vs each OOD set) every cell
stores the FS-OOD metrics (ID test + every shifted set vs each OOD set, OpenOOD v1.5's
``fsood``) and the accuracy on each shifted set (`oodbench.benchmark.jobs`).

``extends: <benchmark>`` starts from another benchmark's definition (a registered name or
a path) and replaces the keys given here (the full-spectrum variants extend their plain
benchmark with ``csid:``); the resolved definition is what the digest and results name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodbench.datasets.base import DatasetRef
from oodbench.datasets.transform import INTERPOLATIONS, ImageSpec
from oodbench.errors import OodbenchError, did_you_mean, require_file
from oodbench.registry import BENCHMARKS, DATASETS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BENCHMARK_DIR = CONFIG_DIR / "benchmarks"

REQUIRED = ("name", "version", "image", "num_classes", "id", "near", "far")
OPTIONAL = ("description", "seed", "ood_val", "notes", "definitions", "csid", "extends")
ID_SPLITS = ("train", "val", "test")
IMAGE_KEYS = ("size", "channels", "resize", "interpolation")


@dataclass
class Benchmark:
    name: str
    version: int | str
    image: ImageSpec
    num_classes: int
    id_splits: dict[str, DatasetRef]
    ood_val: dict[str, DatasetRef]
    near: dict[str, DatasetRef]
    far: dict[str, DatasetRef]
    description: str = ""
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    holdout_classes: list[int] = field(default_factory=list)  # ID test classes held out as pseudo-novel
    csid: dict[str, DatasetRef] = field(default_factory=dict)  # covariate-shifted ID test sets (FS-OOD)

    @property
    def ood_test(self) -> dict[str, DatasetRef]:
        return {**self.near, **self.far}

    def group_of(self, dataset: str) -> str:
        return "near" if dataset in self.near else "csid" if dataset in self.csid else "far"

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_yaml(path: Path, what: str) -> Any:
    import yaml

    require_file(path, f"{what} not found: {path}", what)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OodbenchError(f"{path}:{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OodbenchError(f"cannot read {what} {path}: {exc}") from None


def parse_benchmark(raw: Any, source: str) -> Benchmark:
    if not isinstance(raw, dict):
        raise OodbenchError(f"{source}: a benchmark is a YAML mapping")
    raw = extended(raw, source)
    unknown = [key for key in raw if key not in REQUIRED + OPTIONAL]
    if unknown:
        raise OodbenchError(f"{source}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], REQUIRED + OPTIONAL)}")
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise OodbenchError(f"{source}: missing key '{missing[0]}'")
    seed = int(raw.get("seed", 0))

    def refs(section: str, value: Any = None) -> dict[str, DatasetRef]:
        value = (raw.get(section) if value is None else value) or {}
        if not isinstance(value, dict):
            raise OodbenchError(f"{source}: '{section}' must map names to datasets")
        parsed = {name: DatasetRef.parse(spec, f"{source}: {section}.{name}", seed) for name, spec in value.items()}
        for name, ref in parsed.items():
            if ref.dataset not in DATASETS:
                raise OodbenchError(f"{source}: {section}.{name}: unknown dataset '{ref.dataset}'"
                                    f"{did_you_mean(ref.dataset, DATASETS.names())}; `oodbench list datasets` shows them all")
        return parsed

    id_raw, holdout = holdout_classes(raw.get("id"), source)
    id_splits = refs("id", id_raw)
    for split in id_splits:
        if split not in ID_SPLITS:
            raise OodbenchError(f"{source}: unknown ID split '{split}'{did_you_mean(split, ID_SPLITS)}")
    if "test" not in id_splits:
        raise OodbenchError(f"{source}: 'id' needs a 'test' split")
    csid = refs("csid")
    clash = sorted((set(csid) & (set(raw.get("near") or {}) | set(raw.get("far") or {}))) | set(csid) & {"id_test"})
    if clash:
        raise OodbenchError(f"{source}: csid.{clash[0]}: a covariate-shifted ID set needs a name of its own "
                            "(not an OOD set's, not id_test)")
    image = raw["image"]
    if not isinstance(image, dict) or not {"size", "channels"} <= set(image) <= set(IMAGE_KEYS):
        raise OodbenchError(f"{source}: 'image' must be {{size: N, channels: 1|3}}, optionally with resize: N "
                            f"(the short side before the center crop) and interpolation: "
                            f"{'|'.join(INTERPOLATIONS)}")
    return Benchmark(
        name=str(raw["name"]),
        version=raw["version"],
        image=ImageSpec(int(image["size"]), int(image["channels"]),
                        None if image.get("resize") is None else int(image["resize"]),
                        str(image.get("interpolation", "bilinear"))),
        num_classes=int(raw["num_classes"]),
        id_splits=id_splits,
        ood_val=refs("ood_val"),
        near=refs("near"),
        far=refs("far"),
        description=str(raw.get("description", "")).strip(),
        source=source,
        raw=raw,
        holdout_classes=holdout,
        csid=csid,
    )


def extended(raw: dict, source: str, seen: tuple[str, ...] = ()) -> dict:
    """`raw` with its ``extends:`` resolved: the base benchmark's definition (itself resolved),
    then this file's keys in place of the base's. The base is a registered name, or a YAML path
    (relative to the extending file)."""
    if "extends" not in raw:
        return raw
    base_name = str(raw["extends"])
    if base_name in seen:
        raise OodbenchError(f"{source}: 'extends' loops ({' -> '.join([*seen, base_name])})")
    path = Path(base_name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        path = path if path.is_absolute() else Path(source).parent / path
    else:
        path = BENCHMARK_DIR / f"{base_name}.yaml"
        if not path.is_file():
            names = [p.stem for p in BENCHMARK_DIR.glob("*.yaml")]
            raise OodbenchError(f"{source}: extends unknown benchmark '{base_name}'{did_you_mean(base_name, names)}")
    base = read_yaml(path, "benchmark file")
    if not isinstance(base, dict):
        raise OodbenchError(f"{path}: a benchmark is a YAML mapping")
    base = extended(base, str(path), (*seen, base_name))
    return {**base, **{key: value for key, value in raw.items() if key != "extends"}}


def holdout_classes(id_raw: Any, source: str) -> tuple[Any, list[int]]:
    """The ID splits without the test split's ``holdout_classes``, and those classes."""
    if not isinstance(id_raw, dict):
        return id_raw, []
    splits, holdout = dict(id_raw), []
    for split, spec in id_raw.items():
        if not isinstance(spec, dict) or "holdout_classes" not in spec:
            continue
        classes = spec["holdout_classes"]
        if split != "test":
            raise OodbenchError(f"{source}: id.{split}: holdout_classes belongs to the ID test split (keep held-out "
                                "classes out of the other splits with the dataset's options)")
        if not isinstance(classes, list) or not classes or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
            raise OodbenchError(f"{source}: id.test.holdout_classes must be a non-empty list of class indices, "
                                f"got {classes!r}")
        holdout = sorted(set(classes))
        splits[split] = {k: v for k, v in spec.items() if k != "holdout_classes"}
    return splits, holdout


def load_benchmark(name_or_path: str) -> Benchmark:
    """A registered benchmark name (configs/benchmarks/*.yaml) or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    given_as_path = "/" in name_or_path and path.is_dir()  # a bare name is a registered benchmark (not ./imagenet/)
    if path.suffix in (".yaml", ".yml") or path.is_file() or given_as_path:
        return parse_benchmark(read_yaml(path, "benchmark file"), str(path))
    return BENCHMARKS.get(name_or_path)()


def _register_shipped() -> None:
    for path in sorted(BENCHMARK_DIR.glob("*.yaml")):
        BENCHMARKS.register(path.stem)(lambda path=path: parse_benchmark(read_yaml(path, "benchmark file"), str(path)))


_register_shipped()
