"""ImageNet-size extraction: images/s of a ResNet-50 over JPEGs in ImageNet's folder layout,
decoded by 0..N DataLoader workers (pinned memory on CUDA), through oodbench's real path
(the imagenet_folder source, the 224-pixel test transform, `extract` with its shards), and
the process's peak resident memory, which stays bounded by a few batches of images plus
the outputs (features N x 2048) whatever the number of images.

Synthetic photographs (500 x 375 JPEGs, ImageNet's typical size) are written once to a
temporary folder; the network is torchvision's ResNet-50 with random weights (the speed
does not depend on the weights). On a CUDA device it also reports the GPU's share of the
time (the forward alone on pre-decoded batches), i.e. whether decoding keeps it busy.

    .venv/bin/python benchmarks/extraction_speed.py [--images 512] [--workers 0,4,8]
        [--batch-size 128] [--device auto] [--transform timm|torchvision|benchmark]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodbench.storage.caches import OutputCache
from oodbench.benchmark.extraction import extract
from oodbench.datasets.base import DatasetRef, load_dataset
from oodbench.datasets.transform import ImageSpec
from oodbench.models.adapter import ModelAdapter

TRANSFORMS = {  # the ResNet-50 test transforms of the three kinds of sources
    "benchmark": ImageSpec(224, 3, 256),  # OpenOOD's ImageNet transform
    "torchvision": ImageSpec(224, 3, 232, "bilinear", "torchvision ResNet50_Weights.IMAGENET1K_V2"),
    "timm": ImageSpec(224, 3, 235, "bicubic", "timm data config of resnet50.a1_in1k: crop_pct 0.95"),
}


def write_jpegs(root: Path, count: int) -> None:
    """`count` 500x375 JPEGs under root/imagenet/val/<wnid>/ (all 1,000 class folders)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for wnid in range(1000):
        (root / "imagenet" / "val" / f"n{wnid:08d}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.roll(base, index * 7, axis=1)  # distinct images without drawing 1000s of random ones
        path = root / "imagenet" / "val" / f"n{index % 1000:08d}" / f"ILSVRC2012_val_{index:08d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default="0,4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--transform", choices=sorted(TRANSFORMS), default="timm")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = ModelAdapter(resnet50(), num_classes=1000, identity="benchmark:resnet50",
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).to(device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    image = TRANSFORMS[args.transform]
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else os.cpu_count()} "
          f"{'' if device.startswith('cuda') else 'cores'}), {args.images} JPEGs 500x375, batch {args.batch_size}, "
          f"transform {image.describe()} ({image.origin or 'benchmark'}), torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_jpegs(root, args.images)
        split = load_dataset(DatasetRef("imagenet_folder", {"split": "val"}), root, image)
        sample = torch.stack([split[i][0] for i in range(min(args.batch_size, len(split)))]).to(device)
        with torch.no_grad():  # warm-up, and the forward alone on one decoded batch
            model.features(sample)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                model.features(sample)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            forward_rate = 3 * len(sample) / (time.perf_counter() - start)
        print(f"forward alone (decoded batch on the device): {forward_rate:,.0f} images/s")
        for workers in [int(w) for w in args.workers.split(",")]:
            cache = OutputCache(root / f"cache{workers}")
            start = time.perf_counter()
            outputs = extract(model, split, args.batch_size, workers, device, cache=cache, key=f"w{workers}")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rate = len(outputs) / seconds
            print(f"num_workers {workers:2d}: {rate:8,.0f} images/s ({seconds:.1f} s; {rate / forward_rate:5.1%} of "
                  f"the forward alone); peak RSS so far {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
