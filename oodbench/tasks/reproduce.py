"""``oodbench reproduce <release> <table>``: regenerate a published table with the release's
own checkpoints, under the convention profile that reproduces its numbers.

1. `readiness`: which of the table's assets (image lists, images, checkpoints) are under the
   data root (fetched, or placed there by hand in the released layout), and which training
   seeds' checkpoints are there;
2. with ``fetch``, gets what is missing (`oodbench.datasets.download`, the only step that
   touches the network, and only when asked);
3. says exactly what is still missing and the `oodbench data fetch` command that gets it;
4. runs each of the table's benchmarks with its released model (one model per present seed,
   so the tables show mean ± std over the seeds, the published form), the release's methods
   and convention profile, honouring ``limit``; a benchmark that cannot run is named with
   why, and the others still run.

The table itself is printed by ``oodbench leaderboard`` from the results store (the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from oodbench.datasets.release import Asset, Release, Target, asset_spec, load_release
from oodbench.errors import OodbenchError


@dataclass
class Readiness:
    missing: list[Asset]  # the table's assets whose files are not under the data root
    seeds: dict[str, list[str]]  # benchmark -> the seeds whose checkpoints are present
    absent: dict[str, list[Path]]  # benchmark -> the checkpoint files that are not

    def fetch_command(self, release: Release, root: Path) -> str:
        names = " ".join(asset_spec(release, asset) for asset in self.missing)
        return f"oodbench data fetch {names} --data-root {root}"


def readiness(release: Release, target: Target, root: Path) -> Readiness:
    """What of `target` is under `root` (file lookups only; nothing is read or downloaded)."""
    missing = [asset for asset in release.target_assets(target) if not (root / asset.provides).exists()]
    seeds, absent = {}, {}
    for benchmark, name in target.benchmarks.items():
        files = release.models[name].checkpoints(root)
        seeds[benchmark] = [seed for seed, path in files.items() if path.is_file()]
        absent[benchmark] = [path for path in files.values() if not path.is_file()]
    return Readiness(missing, seeds, absent)


def reproduce(release_name: str, table: str, root: Path, fetch: bool = False, source_dir: Path | None = None,
              postprocessors: list[str] | None = None, echo: Callable[[str], None] = print,
              warn: Callable[[str], None] = print, **overrides: Any) -> tuple[Release, list[str], list[str]]:
    """Check, optionally fetch, then run `table` of `release_name` into ``overrides["results"]``.

    Returns (release, the benchmarks that ran, their model labels). Raises OodbenchError when
    nothing could run; `warn` gets one line per missing part (with the command that gets it)."""
    release = load_release(release_name)
    target = release.target(table)
    ready = readiness(release, target, root)
    if fetch and ready.missing:
        from oodbench.tasks.data import fetch as fetch_name

        try:
            fetch_name(f"{release.name}:{table}", root, echo, source_dir)
        except OodbenchError as exc:
            warn(str(exc))
        ready = readiness(release, target, root)
    if ready.missing:
        where = ", ".join(f"{asset.provides} ({asset.name})" for asset in ready.missing)
        warn(f"{release.name} {table}: not under {root}: {where}; `{ready.fetch_command(release, root)}` gets them "
             f"(or `oodbench reproduce {release.name} {table} --fetch --data-root {root}`); until then a split without the release's list "
             "reads oodbench's fallback (`oodbench data status <benchmark>` says which)")
    ran, labels = [], []
    for benchmark, name in target.benchmarks.items():
        if ready.absent[benchmark]:
            asset = release.assets[release.models[name].asset]
            warn(f"{benchmark}: checkpoint(s) not found: {', '.join(map(str, ready.absent[benchmark]))}; "
                 f"`oodbench data fetch {asset_spec(release, asset)} --data-root {root}` gets them")
        if not ready.seeds[benchmark]:
            warn(f"{benchmark}: not run (no checkpoint of openood:{name})")
            continue
        try:
            label = _run(release, target, benchmark, name, ready.seeds[benchmark], root, postprocessors, overrides)
        except OodbenchError as exc:
            warn(f"{benchmark}: not run: {exc}")
            continue
        ran.append(benchmark)
        labels.append(label)
    if not ran:
        raise OodbenchError(f"nothing of {release.name} {table} could run (the lines above say what is missing)")
    return release, ran, list(dict.fromkeys(labels))


def _run(release: Release, target: Target, benchmark: str, name: str, seeds: list[str], root: Path,
         postprocessors: list[str] | None, overrides: dict[str, Any]) -> str:
    """Run one benchmark of the table; returns its model's label in the store."""
    from oodbench.benchmark.config import load_config
    from oodbench.benchmark.runner import run_experiment

    model = {"name": f"openood:{name}", **({"label": target.label} if target.label else {})}
    config = load_config({"benchmark": benchmark, "models": [model],
                          "postprocessors": postprocessors or list(release.methods),
                          "conventions": release.conventions, "data_root": str(root)}, **overrides)
    config.models = [model for model in config.models if (model.member or "") in seeds]  # the seeds present
    run_experiment(config)
    return config.models[0].model_label
