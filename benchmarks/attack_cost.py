"""Cost of one attacked split against the floor of its passes.

A PGD attack with S steps costs, per image, S+1 forward and S backward passes (one per
iterate, the last iterate only scored). This script attacks random 32x32 images with
``pgd`` on the MSP score through the attack task's own path (`oodbench.tasks.attacks.evaluate.
attacked_scores`: a DataLoader over a dataset, batches moved to the device, per-image random
starts, the best iterate kept, the attacked images scored by the method and written to the
attack cache), and in the same run times the bare S+1 forward and S input-backward passes
on device-resident batches. It prints images/s of both, the ratio (goal: at most 1.15), and
the time an eps sweep over a CIFAR-10 test set would take at that rate (10,000 ID test
images and the 1,000-image-per-set OOD sample of ``--limit 1000``, 6 OOD sets, both sides
attacked, per eps).

    python benchmarks/attack_cost.py [--arch resnet18_32x32|resnet20] [--device cuda]
        [--images 256] [--batch-size 128] [--steps 20] [--limit 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from oodbench.tasks.attacks.evaluate import AttackCache, attacked_scores
from oodbench.tasks.attacks.objectives import detector_objective
from oodbench.tasks.attacks.spec import parse_attack
from oodbench.models.adapter import ModelAdapter
from oodbench.models.cifar_resnet import TRAINING_MEAN, TRAINING_STD
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bare passes and timer PRO's benchmark uses
from pro_throughput import bare_passes, timed  # noqa: E402


def network(arch: str) -> torch.nn.Module:
    if arch == "resnet20":
        from oodbench.models.cifar_resnet import build

        return build("resnet20")
    from oodbench.models.openood import ResNet18_32x32

    return ResNet18_32x32(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18_32x32", choices=["resnet18_32x32", "resnet20"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--limit", type=int, default=1000, help="OOD images per set in the sweep estimate")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the fastest of each counts")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ModelAdapter(network(args.arch), num_classes=10, identity=f"benchmark:{args.arch}",
                         mean=TRAINING_MEAN, std=TRAINING_STD).to(args.device).eval()
    images = torch.rand(args.images, 3, 32, 32)
    batches = [x.to(args.device) for x in images.split(args.batch_size)]
    method = POSTPROCESSORS.get("msp")()
    objective = detector_objective(method, model, batches[0])
    spec = parse_attack({"eps": ["8/255"], "steps": args.steps})
    outputs = Outputs(logits=torch.zeros(len(images), 10), model=model,
                      inputs=TensorDataset(images, torch.zeros(len(images))), meta={"batch_size": args.batch_size})

    with tempfile.TemporaryDirectory() as folder:
        cache = AttackCache(folder)
        rounds = iter(range(10 ** 6))  # a new key each round: every round attacks, none reads the cache
        attack = lambda: attacked_scores(spec, method, objective, model, outputs, 8 / 255, 1.0, cache,  # noqa: E731
                                         f"round {next(rounds)}")
        bare = lambda: bare_passes(model, batches, args.steps)  # noqa: E731
        bare_s, attack_s = float("inf"), float("inf")
        for _ in range(args.repeats):  # interleaved, so that drifting load hits both alike
            bare_s = min(bare_s, timed(bare, args.device))
            attack_s = min(attack_s, timed(attack, args.device))

    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    rate = args.images / attack_s
    sweep_images = 10_000 + 6 * args.limit
    print(f"device {args.device} ({name}), threads {torch.get_num_threads()}, {args.images} images of 3x32x32, "
          f"batch {args.batch_size}, {args.arch} (random weights), PGD L-inf {args.steps} steps")
    print(f"bare passes ({args.steps + 1} forward, {args.steps} backward): {args.images / bare_s:.2f} images/s")
    print(f"attacked split (msp): {rate:.2f} images/s")
    print(f"ratio attack / bare: {attack_s / bare_s:.3f} (goal <= 1.15)")
    print(f"one eps of a CIFAR-10 sweep ({sweep_images} images, both sides, per method): "
          f"{sweep_images / rate / 3600:.2f} h at this rate")


if __name__ == "__main__":
    main()
