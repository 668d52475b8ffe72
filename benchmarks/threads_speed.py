"""Torch intra-op threads: one against all cores, for the forward passes of an extraction and
the forward + backward passes of an input-gradient method (PRO-MSP, K=1), on the built-in
digits model (digits-cnn, 8x8 images) and on the CIFAR-10 ResNet-20 (../shared's weights,
or random ones without it; 32x32 images). The basis of ``run --threads``' default.

Interleaved rounds after a warm-up; prints images/s for each (model, pass, threads), the
median over the rounds of the time with one thread / with all, and the load average.

    .venv/bin/python benchmarks/threads_speed.py [--rounds 5] [--images 2048] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, load_model
from oodbench.models.cifar_resnet import TRAINING_MEAN, TRAINING_STD, build
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

REPO = Path(__file__).resolve().parents[1]
RESNET20 = REPO.parent / "shared" / "models" / "cifar10" / "resnet20-12fca82f.th"


def models(cache_dir: Path) -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    digits = load_model(ModelSpec("digits-cnn"), ModelContext(cache_dir, cache_dir))
    if RESNET20.is_file():
        resnet = load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=str(RESNET20)),
                            ModelContext(cache_dir, cache_dir))
    else:
        torch.manual_seed(0)
        resnet = ModelAdapter(build("resnet20"), num_classes=10, identity="benchmark:resnet20",
                              mean=TRAINING_MEAN, std=TRAINING_STD)
    return {"digits-cnn": (digits, (1, 8, 8)), "resnet20": (resnet, (3, 32, 32))}


def forward(model, images: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for x in images.split(batch_size):
            model.features(x)


def pro(model, images: torch.Tensor, batch_size: int) -> None:
    outputs = Outputs(logits=torch.zeros(len(images), 10), model=model,
                      inputs=TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                      meta={"batch_size": batch_size})
    POSTPROCESSORS.get("pro_msp")(K=1, eps=1e-3).score(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    cores = torch.get_num_threads()
    nets = models(Path(tempfile.mkdtemp(prefix="oodbench-threads-")))
    cases = {(name, kind): (fn, model, torch.rand(args.images if kind == "forward" else args.images // 4, *shape))
             for name, (model, shape) in nets.items() for kind, fn in (("forward", forward), ("pro_msp K=1", pro))}
    seconds = {(case, threads): [] for case in cases for threads in (1, cores)}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for case, (fn, model, images) in cases.items():
            for threads in (1, cores):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn(model, images, args.batch_size)
                if round_:
                    seconds[case, threads].append(time.perf_counter() - start)
    torch.set_num_threads(cores)
    print(f"{os.cpu_count()} logical CPUs, torch default {cores} threads; batch {args.batch_size}; medians of "
          f"{args.rounds} interleaved rounds after a warm-up; load average {os.getloadavg()[0]:.1f}")
    for case, (_, _, images) in cases.items():
        one, many = (statistics.median(seconds[case, t]) for t in (1, cores))
        ratio = statistics.median(a / b for a, b in zip(seconds[case, 1], seconds[case, cores]))
        print(f"{case[0]:10s} {case[1]:12s} 1 thread {len(images) / one:9.0f} img/s   {cores} threads "
              f"{len(images) / many:9.0f} img/s   time 1 / {cores}: {ratio:.2f}")


if __name__ == "__main__":
    main()
