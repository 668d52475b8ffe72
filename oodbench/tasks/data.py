"""`oodbench data status` and `oodbench data fetch`: what a benchmark needs, what is there,
and the one place oodbench downloads anything.

``fetch`` downloads a published release's assets (``openood-v1.5:cifar10``: OpenOOD v1.5's
lists, images and checkpoints for its CIFAR-10 table; ``openood-v1.5/tin``: one asset; see
`oodbench.datasets.release` and `oodbench.datasets.download`), or what torchvision can
(CIFAR-10/100, SVHN, the MNIST family) in the layouts the loaders read; for the raw releases
nobody packs (Tiny ImageNet, Textures, the ODIN sets) it prints where to get them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from oodbench.errors import DatasetMissing, OodbenchError, did_you_mean, require_folder

DEFAULT_DATA_ROOT = "./data"


def resolve_data_root(data_root: str | None) -> Path:
    """--data-root, else OODBENCH_DATA, else ./data; one line when a file is there."""
    return require_folder(data_root or os.environ.get("OODBENCH_DATA") or DEFAULT_DATA_ROOT, "data root",
                          "set by --data-root or OODBENCH_DATA")


# --------------------------------------------------------------------------- status


@dataclass
class SplitStatus:
    split: str  # e.g. "id:test", "near:tin"
    dataset: str
    status: str  # present | missing | error
    samples: int | None
    detail: str  # where the samples come from, or why they are absent


def benchmark_status(benchmark, data_root: Path) -> list[SplitStatus]:
    """Each split of `benchmark`, resolved against `data_root` (images are not decoded)."""
    from oodbench.benchmark.plan import benchmark_splits
    from oodbench.datasets.base import load_dataset

    rows = []
    for name, split in benchmark_splits(benchmark, fit_split="").items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dataset = load_dataset(split.ref, data_root, benchmark.image, ood=split.ood)
        except DatasetMissing as exc:
            rows.append(SplitStatus(name, split.ref.dataset, "missing", None, str(exc)))
            continue
        except OodbenchError as exc:
            rows.append(SplitStatus(name, split.ref.dataset, "error", None, str(exc)))
            continue
        notes = "; ".join(str(w.message) for w in caught)
        rows.append(SplitStatus(name, split.ref.dataset, "present", len(dataset),
                                _origin(dataset) + (f" (note: {notes})" if notes else "")))
    return rows


def _origin(dataset) -> str:
    """The description of where the samples come from, through any subset wrappers."""
    while dataset is not None:
        if getattr(dataset, "origin", ""):
            return dataset.origin
        dataset = getattr(dataset, "base", None)
    return ""


# --------------------------------------------------------------------------- fetch


def _torchvision(cls_name: str, folder: str | None = None, variants: tuple[dict, ...] = ({},),
                 **kwargs: Any) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        for variant in variants:
            cls(str(root / folder if folder else root), download=True, **kwargs, **variant)

    return download


BOTH = ({"train": True}, {"train": False})
DOWNLOADS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "cifar10": ("CIFAR-10 (python pickle) -> cifar-10-batches-py/", _torchvision("CIFAR10", variants=BOTH)),
    "cifar100": ("CIFAR-100 (python pickle) -> cifar-100-python/", _torchvision("CIFAR100", variants=BOTH)),
    "svhn": ("SVHN test -> SVHN/test_32x32.mat", _torchvision("SVHN", folder="SVHN", split="test")),
    "mnist": ("MNIST -> MNIST/raw/", _torchvision("MNIST", variants=BOTH)),
    "fashion_mnist": ("Fashion-MNIST -> FashionMNIST/raw/", _torchvision("FashionMNIST", variants=BOTH)),
    "kmnist": ("KMNIST -> KMNIST/raw/", _torchvision("KMNIST", variants=BOTH)),
    "emnist": ("EMNIST (all subsets; the letters are used) -> EMNIST/raw/", _torchvision("EMNIST", split="letters")),
    "qmnist": ("QMNIST test -> QMNIST/raw/", _torchvision("QMNIST", what="test")),
}

OPENOOD = ("OpenOOD v1.5's image lists, images and checkpoints: `oodbench data fetch openood-v1.5:<table>` "
           "(cifar10, cifar100, imagenet200, imagenet, their _fs forms, osr_mnist6) gets what a table needs into "
           "{root}/benchmark_imglist/, images_classic/, images_largescale/ and openood_results/; "
           "`oodbench data fetch openood-v1.5/<asset>` one asset")
INSTRUCTIONS: dict[str, str] = {
    "tin": ("Tiny ImageNet: download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it as "
            "{root}/tin (so that {root}/tin/val/val_annotations.txt exists); or use OpenOOD's filtered lists "
            "(`oodbench data fetch openood-v1.5/tin`)"),
    "textures": ("Textures (DTD): download https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz "
                 "and put the images of dtd/images/<class>/ under {root}/textures/<class>/; or use OpenOOD's "
                 "lists (`oodbench data fetch openood-v1.5/texture`)"),
    "places365": ("Places365: OpenOOD's filtered 35,195 images come with its lists (`oodbench data fetch "
                  "openood-v1.5/places365`); or put your own Places365 images under {root}/places365/ (any depth)"),
    "openood": OPENOOD,
    "odin": ("ODIN's resized sets (LSUN_resize, Imagenet_resize, ...): download the tarballs linked from "
             "https://github.com/facebookresearch/odin and unpack them as {root}/odin/LSUN_resize/, "
             "{root}/odin/Imagenet_resize/"),
}


def fetch(name: str, data_root: Path, echo: Callable[[str], None] = print, source_dir: Path | None = None) -> None:
    """Get `name` into `data_root`: a release's assets (``<release>:<table>``, ``<release>/<asset>``;
    `source_dir` imports archives already downloaded), a torchvision download, or instructions."""
    from oodbench.datasets.release import release_names

    if ":" in name or "/" in name or name in release_names():
        from oodbench.datasets.download import install
        from oodbench.datasets.release import find_assets

        release, assets = find_assets(name)
        if source_dir is not None and not Path(source_dir).expanduser().is_dir():
            raise OodbenchError(f"{source_dir} does not exist (--from names the folder that holds the archives)")
        if len(assets) == 1:
            install(release, assets[0], data_root, source_dir, echo)
            return
        failed = []  # one asset's failure does not stop the others
        for asset in assets:
            try:
                install(release, asset, data_root, source_dir, echo)
            except OodbenchError as exc:
                echo(f"{asset.name}: not fetched: {exc}")
                failed.append(asset.name)
        if failed:
            then = (f"put those archives in {source_dir} and rerun" if source_dir is not None
                    else "rerun the same command to get them")
            raise OodbenchError(f"{len(failed)} of {len(assets)} assets of {name} not fetched ({', '.join(failed)}: "
                                f"the lines above say why); {then}")
        return
    if source_dir is not None:
        raise OodbenchError(f"--from imports a release's archives (e.g. openood-v1.5:cifar10), not '{name}'")
    if name in INSTRUCTIONS:
        echo(INSTRUCTIONS[name].format(root=data_root))
        return
    if name not in DOWNLOADS:
        known = sorted(DOWNLOADS) + sorted(INSTRUCTIONS)
        raise OodbenchError(f"nothing to fetch named '{name}'{did_you_mean(name, known)}; "
                            f"known: {', '.join(known)}, or a release's table or asset (openood-v1.5:cifar10, "
                            "openood-v1.5/tin)")
    what, download = DOWNLOADS[name]
    echo(f"downloading {what} into {data_root}")
    data_root.mkdir(parents=True, exist_ok=True)
    before = set(data_root.iterdir())
    try:
        download(data_root)
    except Exception as exc:  # urllib/HTTP/checksum errors of many types: one line for the user
        for made in set(data_root.iterdir()) - before:  # the empty folders torchvision made (SVHN/)
            _remove_empty(made)
        raise OodbenchError(f"download of {name} failed ({type(exc).__name__}: {exc}); check the network, "
                            f"or place the files in {data_root} by hand") from None
    echo(f"done: {name} is in {data_root}")


def _remove_empty(folder: Path) -> None:
    """Remove `folder` if it holds nothing but empty folders (what a failed download leaves)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for child in folder.iterdir():
        _remove_empty(child)
    if not any(folder.iterdir()):
        folder.rmdir()
