"""S&I as landed (the whole network per split layer and step) against S&I computing each
head once (oodbench/postprocessors/sni.py), and both against one bare forward + backward.

On the real CIFAR-10 ResNet-20 (../shared/models/cifar10/resnet20-12fca82f.th through the
``cifar_resnet`` model source) and real CIFAR-10 test images (../shared/data); without
../shared, a randomly initialised ResNet-20 on uniform noise images (say so when quoting
the numbers). Defaults: every BatchNorm is a split layer (19), eta = 0.001, T = 2.

Measured in the same run, on the same device-resident batches:

- landed: ``tests/sni_landed.py``, the implementation this change replaced, frozen;
- current: ``SplittingIntegrating.score_batch``;
- bare: one forward pass and one backward pass to the input, the floor of any
  gradient-based score.

One warm-up round, then interleaved rounds (so drifting load hits all three alike);
checks that both S&I versions give identical scores, prints median images/s and the time
of each over the bare pass, and the ratio landed / current last (goal: at least 2).

    .venv/bin/python benchmarks/sni_throughput.py [--device cuda] [--images 128] [--batch-size 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the frozen baseline lives beside the test that holds it

from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, load_model  # noqa: E402
from oodbench.models.cifar_resnet import TRAINING_MEAN, TRAINING_STD, build  # noqa: E402
from oodbench.postprocessors.sni import SplittingIntegrating  # noqa: E402
from tests.sni_landed import landed_sni_score_batch  # noqa: E402

SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
CIFAR_TEST_BATCH = SHARED / "data" / "cifar-10-batches-py" / "test_batch"


def resnet20_and_images(count: int, cache_dir: Path) -> tuple[ModelAdapter, torch.Tensor, str]:
    if CHECKPOINT.is_file() and CIFAR_TEST_BATCH.is_file():
        model = load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=str(CHECKPOINT)),
                           ModelContext(cache_dir=cache_dir, data_root=SHARED / "data"))
        with open(CIFAR_TEST_BATCH, "rb") as handle:
            pixels = np.asarray(pickle.load(handle, encoding="latin1")["data"])
        pixels = np.resize(pixels, (count, pixels.shape[1]))  # repeats the 761 images if asked for more
        images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float() / 255
        return model, images, "real ResNet-20 (../shared), real CIFAR-10 test images"
    torch.manual_seed(0)
    model = ModelAdapter(build("resnet20"), num_classes=10, identity="benchmark:resnet20",
                         mean=TRAINING_MEAN, std=TRAINING_STD)
    return model, torch.rand(count, 3, 32, 32), "random-weight ResNet-20, uniform noise images (no ../shared)"


def bare_pass(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).max(dim=1).values.sum(), x)
    return grad


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, batches: list[torch.Tensor], device: str) -> tuple[float, list[torch.Tensor]]:
    synchronize(device)
    start = time.perf_counter()
    results = [fn(x) for x in batches]
    synchronize(device)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=str(REPO / ".oodbench_cache"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, images, what = resnet20_and_images(args.images, Path(args.cache_dir))
    model = model.to(args.device)
    batches = [x.to(args.device) for x in images.split(args.batch_size)]
    current = SplittingIntegrating()
    ways = {
        "landed": lambda x: landed_sni_score_batch(model, x),
        "current": lambda x: current.score_batch(model, x),
        "bare": lambda x: bare_pass(model, x),
    }

    results = {name: timed(fn, batches, args.device)[1] for name, fn in ways.items()}  # warm-up
    landed_scores, current_scores = torch.cat(results["landed"]), torch.cat(results["current"])
    difference = (landed_scores - current_scores).abs().max().item()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            seconds[name].append(timed(fn, batches, args.device)[0])
    median = {name: statistics.median(values) for name, values in seconds.items()}

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"{what}; device {args.device} ({device}), threads {torch.get_num_threads()}, "
          f"{args.images} images in batches of {args.batch_size}; S&I defaults: "
          f"{len([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])} BatchNorm splits, "
          f"eta {current.params['eta']}, T {current.params['steps']}; medians of {args.rounds} interleaved rounds")
    print(f"max abs difference landed vs current scores: {difference:.3g} (must be 0)")
    for name, label in (("bare", "bare forward + backward"), ("landed", "S&I landed"), ("current", "S&I current")):
        print(f"{label:24s} {args.images / median[name]:9.1f} images/s   "
              f"{median[name]:7.2f} s   {median[name] / median['bare']:6.1f}x bare")
    print(f"ratio landed / current: {median['landed'] / median['current']:.2f} (goal >= 2)")


if __name__ == "__main__":
    main()
