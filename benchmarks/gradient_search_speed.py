"""The validation search of PRO-MSP and ODIN: one `score_grid` pass for the whole grid
against the search as landed, on the same images in the same run.

- before (as landed): PRO ran one trajectory of the largest K per eps (every smaller K
  its prefix minimum), each with its own clean forward and backward pass; ODIN ran every
  (T, eps) on its own (forward, backward, forward). Reproduced here with the current code:
  one ``score_grid`` call per eps for PRO, one ``score`` per combination for ODIN;
- after: ``search_hyperparameters``, one ``score_grid`` per split for the whole grid (one
  clean forward for all; a clean backward per T for ODIN, one for all eps for PRO).

The search lists are configs/postprocessors/pro_msp.yaml and odin.yaml. Both ways must
give bit-identical scores (checked) and so choose the same values. On the real CIFAR-10
ResNet-20 with real images from ../shared (ID: the CIFAR-10 test pickle; OOD: LSUN
resize); without ../shared, a random ResNet-20 on noise images (say so when quoting).
One warm-up round, then interleaved rounds; prints the median seconds of each way and
the ratio before / after per method, the total ratio last.

    .venv/bin/python benchmarks/gradient_search_speed.py [--images 128] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from oodbench.benchmark.plan import search_space_for
from oodbench.benchmark.search import search_hyperparameters, validation_aurocs
from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, load_model
from oodbench.models.cifar_resnet import TRAINING_MEAN, TRAINING_STD, build
from oodbench.postprocessors.base import Outputs, grid
from oodbench.registry import POSTPROCESSORS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
CIFAR_TEST_BATCH = SHARED / "data" / "cifar-10-batches-py" / "test_batch"
LSUN = SHARED / "data" / "odin" / "LSUN_resize"


def model_and_images(count: int, cache_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    if CHECKPOINT.is_file() and CIFAR_TEST_BATCH.is_file() and LSUN.is_dir():
        model = load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=str(CHECKPOINT)),
                           ModelContext(cache_dir=cache_dir, data_root=SHARED / "data"))
        with open(CIFAR_TEST_BATCH, "rb") as handle:
            pixels = np.asarray(pickle.load(handle, encoding="latin1")["data"])[:count]
        ood = np.stack([np.asarray(Image.open(LSUN / f"{i}.jpg").convert("RGB")) for i in range(count)])
        return (model, torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float() / 255,
                torch.from_numpy(ood.transpose(0, 3, 1, 2).copy()).float() / 255,
                "real ResNet-20 (../shared); ID CIFAR-10 test images, OOD LSUN resize")
    torch.manual_seed(0)
    model = ModelAdapter(build("resnet20"), num_classes=10, identity="benchmark:resnet20",
                         mean=TRAINING_MEAN, std=TRAINING_STD)
    return (model, torch.rand(count, 3, 32, 32), torch.rand(count, 3, 32, 32).pow(3),
            "random-weight ResNet-20, noise images (no ../shared)")


def outputs_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> Outputs:
    with torch.no_grad():
        logits = torch.cat([model(x) for x in images.split(batch_size)])
    return Outputs(logits=logits, labels=torch.zeros(len(images), dtype=torch.long), model=model,
                   inputs=TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                   meta={"batch_size": batch_size})


def groups_as_landed(name: str, space: dict) -> list[tuple[dict, list[dict]]]:
    """(fixed combination, the combinations one pass scored) as the landed search ran them."""
    if name == "odin":
        return [(combo, [{}]) for combo in grid(space)]
    return [({"eps": eps}, [{"K": k} for k in space["K"]]) for eps in space["eps"]]


def search_as_landed(name: str, space: dict, val: Outputs, ood_val: list[Outputs]) -> dict:
    cls = POSTPROCESSORS.get(name)
    found = {}
    for fixed, combos in groups_as_landed(name, space):
        values = validation_aurocs(cls(**fixed), combos, val, ood_val)
        found.update({tuple(sorted({**fixed, **c}.items())): v for c, v in zip(combos, values)})
    best, chosen = -np.inf, None
    for combo in grid(space):
        if found[tuple(sorted(combo.items()))] > best:
            best, chosen = found[tuple(sorted(combo.items()))], combo
    return chosen


def search_now(name: str, space: dict, val: Outputs, ood_val: list[Outputs]) -> dict:
    return search_hyperparameters(POSTPROCESSORS.get(name), {}, space, val, ood_val, lambda method: None)[0]


def identical_scores(name: str, space: dict, outputs: Outputs) -> bool:
    cls = POSTPROCESSORS.get(name)
    combos = list(grid(space))
    together = dict(zip(map(str, combos), cls().score_grid(outputs, combos)))
    return all(torch.equal(together[str({**fixed, **c})], score)
               for fixed, group in groups_as_landed(name, space)
               for c, score in zip(group, cls(**fixed).score_grid(outputs, group)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="ID val images; as many OOD val images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=str(REPO / ".oodbench_cache"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, id_images, ood_images, what = model_and_images(args.images, Path(args.cache_dir))
    model = model.to(args.device)
    val = outputs_of(model, id_images, args.batch_size)
    ood_val = [outputs_of(model, ood_images, args.batch_size)]
    spaces = {name: search_space_for(name, POSTPROCESSORS.get(name)) for name in ("pro_msp", "odin")}
    for name, space in spaces.items():
        assert identical_scores(name, space, val), f"{name}: grid scores differ from the landed way's"

    ways = {(name, way): fn for name in spaces for way, fn in (("before", search_as_landed), ("after", search_now))}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in ways}
    chosen = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for (name, way), fn in ways.items():
            start = time.perf_counter()
            chosen[name, way] = fn(name, spaces[name], val, ood_val)
            if round_:
                seconds[name, way].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    print(f"{what}; device {args.device}, threads {torch.get_num_threads()}, {args.images} ID + {args.images} "
          f"OOD val images, batch {args.batch_size}; medians of {args.rounds} interleaved rounds after a warm-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, space in spaces.items():
        assert chosen[name, "before"] == chosen[name, "after"], (name, chosen)
        combos = len(list(grid(space)))
        print(f"{name:8s} {combos:3d} combinations   before {median[name, 'before']:8.2f} s   "
              f"after {median[name, 'after']:8.2f} s   ratio before / after {median[name, 'before'] / median[name, 'after']:.2f}"
              f"   chosen {chosen[name, 'after']}")
    before = sum(median[name, "before"] for name in spaces)
    after = sum(median[name, "after"] for name in spaces)
    print(f"scores bit-identical both ways; total ratio before / after: {before / after:.2f}")


if __name__ == "__main__":
    main()
