"""Which ImageNet backbones this machine can load offline, for ``oodbench list models``.

Each row names a model entry as an experiment YAML writes it, whether its weights are
here, and the file found or the path where the source would look:

- timm: the tags below, plus every timm model the local Hugging Face cache holds
  (``<hub cache>/models--timm--<tag>/snapshots/<revision>/model.safetensors``);
- torchvision: each ImageNet weights entry of the architectures below, in torch's hub
  cache (``<torch hub dir>/checkpoints/<file name of the entry's URL>``);
- RobustBench ImageNet ``corruptions`` entries that come as files, in
  ``<model_dir>/imagenet/corruptions/<name>.pt`` (PixMix's ResNet-50 is no RobustBench
  entry: it loads as ``torchvision:resnet50`` with its checkpoint);
- OpenOOD v1.5's ImageNet-200 ResNet-18 checkpoints (three training seeds), in its
  download layout ``<openood_dir>/imagenet200_resnet18_224x224_base_e90_lr0.1_default/s<seed>/best.ckpt``.

Nothing is loaded or downloaded: only file lookups.
"""

from __future__ import annotations

from pathlib import Path

TIMM_TAGS = ("resnet50.a1_in1k", "resnet50.tv_in1k", "resnet50.tv2_in1k", "resnet18.tv_in1k",
             "vit_base_patch16_224.augreg2_in21k_ft_in1k", "convnext_tiny.fb_in1k")
TORCHVISION_ARCHITECTURES = ("resnet18", "resnet50", "wide_resnet50_2", "vit_b_16")
OPENOOD_IMAGENET200 = "imagenet200_resnet18_224x224_base_e90_lr0.1_default"


def _row(entry: str, options: str, path: Path | None, expected: str) -> list[str]:
    return [entry, options, "found" if path is not None else "not found", str(path) if path else expected]


def timm_rows(cache_dir: str | None = None) -> list[list[str]]:
    from oodbench.models.timm_source import hub_cache_dir, hub_weights

    folder = hub_cache_dir(cache_dir)
    cached = sorted(p.name[len("models--timm--"):] for p in folder.glob("models--timm--*")) if folder.is_dir() else []
    rows = []
    for tag in dict.fromkeys([*TIMM_TAGS, *cached]):
        path, expected = hub_weights(tag, cache_dir)
        rows.append(_row(f"timm:{tag}", "pretrained: true", path, expected))
    return rows


def torchvision_rows() -> list[list[str]]:
    from oodbench.models.torchvision_source import entry_file, weights_entries

    rows = []
    for arch in TORCHVISION_ARCHITECTURES:
        for entry in weights_entries(arch):
            path = entry_file(entry)
            rows.append(_row(f"torchvision:{arch}", f"weights: {entry.name}", path if path.is_file() else None,
                             str(path)))
    return rows


def robustbench_rows(model_dir: str) -> list[list[str]]:
    from oodbench.errors import OodbenchError
    from oodbench.models.robustbench_source import model_names

    try:
        names = model_names().get(("imagenet", "corruptions"), [])
    except OodbenchError as exc:
        return [["robustbench:*", "dataset: imagenet, threat_model: corruptions", "not installed", str(exc)]]
    from oodbench.models.robustbench_source import import_robustbench

    _, zoo = import_robustbench()
    entries = zoo.model_dicts[zoo.enums.BenchmarkDataset("imagenet")][zoo.enums.ThreatModel("corruptions")]
    folder = Path(model_dir).expanduser() / "imagenet" / "corruptions"
    rows = []
    for name in names:
        if not entries[name]["gdrive_id"]:  # torchvision downloads or timm hub weights: not files here
            continue
        path = folder / f"{name}.pt"
        rows.append(_row(f"robustbench:{name}", f"dataset: imagenet, threat_model: corruptions, model_dir: {model_dir}",
                         path if path.is_file() else None, str(path)))
    return rows


def openood_rows(openood_dir: str) -> list[list[str]]:
    rows = []
    for seed in range(3):
        path = Path(openood_dir).expanduser() / OPENOOD_IMAGENET200 / f"s{seed}" / "best.ckpt"
        rows.append(_row("openood:resnet18_224x224", f"checkpoint: {path}", path if path.is_file() else None,
                         str(path)))
    return rows


def offline_rows(model_dir: str = "models", openood_dir: str = "results", cache_dir: str | None = None
                 ) -> list[list[str]]:
    """[model entry, options, found | not found, path] for every catalogued ImageNet backbone."""
    return [*timm_rows(cache_dir), *torchvision_rows(), *robustbench_rows(model_dir), *openood_rows(openood_dir)]


def release_rows(data_root: Path, release_name: str = "openood-v1.5") -> list[list[str]]:
    """[model entry, seeds, found | not found, path, fetch command] for each official checkpoint
    release of `release_name`, under the data root where `oodbench data fetch` unpacks it."""
    from oodbench.datasets.release import asset_spec, load_release

    release = load_release(release_name)
    rows = []
    for name, model in release.models.items():
        files = model.checkpoints(data_root)
        found = [seed for seed, path in files.items() if path.is_file()]
        status = "found" if len(found) == len(files) else f"{len(found)} of {len(files)} found" if found else "not found"
        rows.append([f"openood:{name}", ", ".join(model.seeds) or "-", status,
                     str(data_root / model.file.format(seed="s*")) if model.seeds else str(files[""]),
                     f"oodbench data fetch {asset_spec(release, release.assets[model.asset])} --data-root {data_root}"])
    return rows

