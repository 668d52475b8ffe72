"""The real-size setup the speed benchmarks share (leaderboard_overhead.py, search_speed.py).

The CIFAR-10 ResNet-20 of ../shared on real images: ID the CIFAR-10 test JPEGs (1,000 val
+ 2,000 test), OOD val 1,000 Tiny ImageNet val images, OOD test 1,000 each of other Tiny
ImageNet val images, MNIST and LSUN resize. Without ../shared: a randomly initialised
torchvision ResNet-18 (10 classes) on synthetic 32x32 PNG images in the same split sizes.
Feature-based methods fit on ID val (../shared has no CIFAR-10 train split).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET20 = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
BATCH_SIZE = 256
ID_VAL, ID_TEST, OOD = 1000, 2000, 1000

SHARED_BENCHMARK = {
    "name": "real_size_shared", "version": 1, "image": {"size": 32, "channels": 3}, "num_classes": 10,
    "id": {"val": {"dataset": "cifar10", "options": {"split": "test", "format": "folder"},
                   "parts": {"val": ID_VAL, "test": "rest"}, "part": "val"},
           "test": {"dataset": "cifar10", "options": {"split": "test", "format": "folder"},
                    "parts": {"val": ID_VAL, "test": "rest"}, "part": "test", "limit": ID_TEST}},
    "ood_val": {"tin": {"dataset": "tiny_imagenet", "options": {"split": "val"},
                        "parts": {"val": OOD, "test": "rest"}, "part": "val"}},
    "near": {"tin": {"dataset": "tiny_imagenet", "options": {"split": "val"},
                     "parts": {"val": OOD, "test": "rest"}, "part": "test", "limit": OOD}},
    "far": {"mnist": {"dataset": "mnist", "options": {"split": "test"}, "limit": OOD},
            "lsun_resize": {"dataset": "image_folder", "options": {"path": "odin/LSUN_resize"}, "limit": OOD}},
}

SYNTHETIC_MODEL = '''
import torchvision


class ResNet18(torchvision.models.ResNet):
    def __init__(self):
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10)
'''


def synthetic_setup(root: Path) -> tuple[dict, dict, str]:
    """PNG folders of seeded noise images (ID in 10 class folders with a per-class tint, OOD
    sets with other statistics) and a random ResNet-18 saved as a state dict."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def write(folder: Path, count: int, low: int, high: int, classes: int = 1) -> None:
        for index in range(count):
            label = index % classes
            target = folder / (f"class{label}" if classes > 1 else "")
            target.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(low, high, (32, 32, 3), dtype=np.uint8)
            pixels[..., label % 3] //= 1 + label // 3
            Image.fromarray(pixels).save(target / f"{index:05d}.png")

    write(root / "id", ID_VAL + ID_TEST, 0, 256, classes=10)
    for name, (low, high) in {"ood_val": (64, 192), "near": (32, 224), "far_a": (0, 128), "far_b": (128, 256)}.items():
        write(root / name, OOD, low, high)
    (root / "resnet18.py").write_text(SYNTHETIC_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("overhead_resnet18", root / "resnet18.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.ResNet18().state_dict(), root / "resnet18.pt")
    folder = lambda path, **extra: {"dataset": "image_folder", "options": {"path": path}, **extra}  # noqa: E731
    benchmark = {
        "name": "real_size_synthetic", "version": 1, "image": {"size": 32, "channels": 3}, "num_classes": 10,
        "id": {"val": folder("id", parts={"val": ID_VAL, "test": "rest"}, part="val"),
               "test": folder("id", parts={"val": ID_VAL, "test": "rest"}, part="test")},
        "ood_val": {"noise": folder("ood_val")}, "near": {"noise": folder("near")},
        "far": {"dark": folder("far_a"), "bright": folder("far_b")},
    }
    model = {"name": "torch:resnet18", "checkpoint": str(root / "resnet18.pt"),
             "options": {"module": f"{root / 'resnet18.py'}:ResNet18"}}
    return benchmark, model, "random-weight torchvision ResNet-18, synthetic 32x32 PNG images (no ../shared)"


@dataclass
class Setup:
    benchmark: Path  # the benchmark YAML
    data_root: Path
    model: dict  # the experiment config's model entry
    what: str  # one line naming the network and the images


def real_size_setup(work: Path) -> Setup:
    """The benchmark YAML (under `work`), its data root and the model entry: ../shared's when
    present, else synthetic images and a random ResNet-18 written under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    if RESNET20.is_file() and (SHARED / "data" / "cifar10").is_dir():
        benchmark, data_root = SHARED_BENCHMARK, SHARED / "data"
        model = {"name": "cifar_resnet:resnet20", "checkpoint": str(RESNET20)}
        what = "real ResNet-20 (../shared), real images (CIFAR-10 JPEGs, Tiny ImageNet val, MNIST, LSUN resize)"
    else:
        data_root = work / "data"
        benchmark, model, what = synthetic_setup(data_root)
    path = work / "benchmark.yaml"
    path.write_text(yaml.safe_dump(benchmark))
    return Setup(path, data_root, model, what)


def benchmark_arguments(description: str, prefix: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
                        ) -> tuple[argparse.Namespace, Path, Setup]:
    """The benchmark scripts' common command line (--rounds, --threads, --work-dir, and what
    `extra` adds to the parser), torch's threads set, and the real-size setup under the work
    folder (a fresh temp dir by default)."""
    parser = argparse.ArgumentParser(description=description)
    if extra:
        extra(parser)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--work-dir", help="where the synthetic data and the fresh caches go (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=prefix))
    return args, work, real_size_setup(work)
