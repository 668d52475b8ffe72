"""A published release as data: its downloadable assets, its official checkpoints as model
entries, and the tables it publishes (``configs/releases/<name>.yaml``, e.g. ``openood-v1.5``).

- `Asset`: one file to download (a Google Drive id or a URL), its name, where it goes under
  the data root (``into``; archives are unpacked there), the path that exists once it is
  installed (``provides``), and its SHA-256 when published (``record``: recorded in the data
  root's lock file at the first download, see `oodbench.datasets.download`).
- `ReleasedModel`: an official checkpoint release, ``file`` under the data root with ``{seed}``
  standing for each training seed (s0, s1, s2: one cell per seed).
- `Target`: what ``oodbench reproduce <release> <target>`` runs: benchmark -> model entry, and
  the data assets those benchmarks read.

``oodbench data fetch`` names a target's assets as ``<release>:<target>`` and one asset as
``<release>/<asset>`` (``openood-v1.5:cifar10`` is the CIFAR-10 table's lists, images and
checkpoints; ``openood-v1.5/cifar10`` the CIFAR-10 images alone).

The file is the only place addresses live: the downloader never builds a URL from anything
else (OODBENCH_MIRROR, a user's own mirror, replaces the base of every address).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from oodbench.errors import OodbenchError, did_you_mean

RELEASE_DIR = Path(__file__).resolve().parents[2] / "configs" / "releases"
RECORD = "record"


@dataclass(frozen=True)
class Asset:
    name: str
    file: str  # the archive's (or weight file's) name, as the source serves it
    into: str  # folder under the data root it unpacks into (or where the file is placed)
    provides: str  # a path under the data root that exists once installed
    drive: str | None = None  # Google Drive file id
    url: str | None = None
    sha256: str | None = None  # None: record at the first download
    sha256_prefix: str | None = None
    size: int | None = None
    unpack: bool = True


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    architecture: str
    dataset: str  # picks the input normalisation the checkpoint was trained with
    asset: str
    file: str  # under the data root; "{seed}" stands for each seed
    seeds: tuple[str, ...] = ()

    def checkpoints(self, data_root: Path) -> dict[str, Path]:
        """seed -> checkpoint file ('' -> the file of a single-checkpoint release)."""
        return {seed: data_root / self.file.format(seed=seed) for seed in self.seeds or ("",)}


@dataclass(frozen=True)
class Target:
    name: str
    benchmarks: dict[str, str]  # benchmark -> released model name
    data: tuple[str, ...]
    label: str | None = None  # the models' common name in the tables (a seed family's checkpoints)


@dataclass
class Release:
    name: str
    title: str
    source: str
    drive_url: str
    assets: dict[str, Asset]
    models: dict[str, ReleasedModel]
    targets: dict[str, Target] = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # the postprocessors of its tables (reproduce's default)
    conventions: str = "paper"  # the profile that reproduces its numbers

    def asset(self, name: str) -> Asset:
        if name not in self.assets:
            raise OodbenchError(f"{self.name} has no asset '{name}'{did_you_mean(name, self.assets)}; "
                                f"known: {', '.join(self.assets)}")
        return self.assets[name]

    def target(self, name: str) -> Target:
        if name not in self.targets:
            raise OodbenchError(f"{self.name} publishes no table '{name}'{did_you_mean(name, self.targets)}; "
                                f"known: {', '.join(self.targets)}")
        return self.targets[name]

    def target_assets(self, target: Target) -> list[Asset]:
        """The data assets, then the checkpoint assets, a target needs (each once)."""
        names = [*target.data, *(self.models[m].asset for m in target.benchmarks.values())]
        return [self.assets[n] for n in dict.fromkeys(names)]


def release_names() -> list[str]:
    return sorted(p.stem for p in RELEASE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_release(name: str) -> Release:
    """The release `name` (``configs/releases/<name>.yaml``); an unknown name fails with the known ones."""
    import yaml

    path = RELEASE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = release_names()
        raise OodbenchError(f"unknown release '{name}'{did_you_mean(name, known)}; known: {', '.join(known)}")
    return parse_release(yaml.safe_load(path.read_text()), str(path))


def parse_release(raw: dict[str, Any], where: str) -> Release:
    """Validate a release mapping; every reference (target -> model -> asset) must resolve."""
    assets = {name: _asset(name, spec, where) for name, spec in raw["assets"].items()}
    models = {}
    for name, spec in raw.get("models", {}).items():
        model = ReleasedModel(name=name, architecture=spec["architecture"], dataset=spec["dataset"],
                              asset=spec["asset"], file=spec["file"], seeds=tuple(spec.get("seeds", ())))
        if model.asset not in assets:
            raise OodbenchError(f"{where}: model {name} names an unknown asset '{model.asset}'")
        models[name] = model
    targets = {}
    for name, spec in raw.get("targets", {}).items():
        target = Target(name=name, benchmarks=dict(spec["benchmarks"]), data=tuple(spec["data"]), label=spec.get("label"))
        for unknown in [m for m in target.benchmarks.values() if m not in models] + \
                       [a for a in target.data if a not in assets]:
            raise OodbenchError(f"{where}: target {name} names '{unknown}', which the release does not define")
        targets[name] = target
    return Release(name=raw["name"], title=raw.get("title", raw["name"]), source=raw.get("source", ""),
                   drive_url=raw["drive_url"], assets=assets, models=models, targets=targets,
                   methods=tuple(raw.get("methods", ())), conventions=raw.get("conventions", "paper"))


def _asset(name: str, spec: dict[str, Any], where: str) -> Asset:
    if bool(spec.get("drive")) == bool(spec.get("url")):
        raise OodbenchError(f"{where}: asset {name} needs exactly one of 'drive' and 'url'")
    sha256 = spec.get("sha256", RECORD)
    return Asset(name=name, file=spec["file"], into=spec["into"],
                 provides=spec.get("provides") or (f"{spec['into']}/{spec['file']}" if spec.get("unpack") is False
                                                   else spec["into"]),
                 drive=spec.get("drive"), url=spec.get("url"), sha256=None if sha256 == RECORD else sha256.lower(),
                 sha256_prefix=spec.get("sha256_prefix"), size=spec.get("size"), unpack=spec.get("unpack", True))


def find_assets(spec: str) -> tuple[Release, list[Asset]]:
    """``<release>:<target>`` (everything a published table needs) or ``<release>/<asset>`` (one
    asset) -> the release and the assets."""
    if "/" in spec:
        release_name, _, name = spec.partition("/")
        release = load_release(release_name)
        return release, [release.asset(name)]
    release_name, _, name = spec.partition(":")
    release = load_release(release_name)
    if not name:
        raise OodbenchError(f"name what to fetch of {release_name}: a table as {release_name}:<table> "
                            f"({', '.join(release.targets)}) or one asset as {release_name}/<asset> "
                            f"({', '.join(release.assets)})")
    return release, release.target_assets(release.target(name))


def asset_spec(release: Release, asset: Asset) -> str:
    """The `oodbench data fetch` argument that gets `asset` alone."""
    return f"{release.name}/{asset.name}"
