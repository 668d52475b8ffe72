"""The two built-in models of the `digits` benchmark, trained on first use and cached.

``digits-cnn``: a small CNN trained with cross-entropy on the ID train split (digits
0-5). ``digits-cnn-robust``: the same network trained adversarially (Madry et al., 2018):
each batch replaced by PGD L-inf examples (eps = 0.1 in [0,1] pixels, 7 steps of 0.025,
random start). Training is deterministic given the seed and takes seconds on a CPU; the
weights are cached under ``<cache>/models/`` keyed by the recipe and the training data,
and verified (key and checksum) each time they are read: damaged or misplaced weights are
trained again, with one warning line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodbench.storage.files import VerifiedFiles
from oodbench.models.adapter import ModelAdapter, ModelContext, register_model_source
from oodbench.errors import OodbenchError
from oodbench.identity import key_of, model_weights_key_text

RECIPES = {
    "digits-cnn": {"epochs": 40, "lr": 1e-3, "batch_size": 64, "seed": 0, "pgd": None},
    "digits-cnn-robust": {
        "epochs": 40, "lr": 1e-3, "batch_size": 64, "seed": 0,
        "pgd": {"eps": 0.1, "step": 0.025, "steps": 7},
    },
}
RECIPE_VERSION = 3


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
             steps: int, generator: torch.Generator) -> torch.Tensor:
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = nn.functional.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def recipe_of(name: str, seed: int | None = None) -> dict:
    """The training recipe of a built-in model; another `seed` gives an independently trained copy."""
    return RECIPES[name] if seed is None else {**RECIPES[name], "seed": int(seed)}


def train(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None) -> DigitsCNN:
    """Train on one CPU thread: floating-point sums then do not depend on the machine's
    thread count, so the same seed gives the same weights everywhere (and on a network
    this small, one thread is also the fastest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(name, images, labels, seed)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int | None) -> DigitsCNN:
    recipe = recipe_of(name, seed)
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    model = DigitsCNN(int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), recipe["batch_size"]):
            batch = order[start : start + recipe["batch_size"]]
            x, y = images[batch], labels[batch]
            if recipe["pgd"]:
                model.eval()
                x = pgd_linf(model, x, y, generator=generator, **recipe["pgd"])
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _training_data(context: ModelContext) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The digits ID train split as tensors, and its fingerprint (part of the weights' key)."""
    from oodbench.datasets.benchmarks import load_benchmark
    from oodbench.datasets.base import load_dataset, split_fingerprint_of
    from oodbench.file_state import FileState

    benchmark = load_benchmark("digits")
    ref = benchmark.id_splits["train"]
    dataset = load_dataset(ref, context.data_root, benchmark.image)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return images, labels, split_fingerprint_of(dataset, ref, False, FileState(context.data_root))


class WeightsCache(VerifiedFiles):
    """Trained built-in weights under ``<cache>/models/<name>-<key hash>.pt``, each file
    holding its full key (model, recipe, training data) and a checksum of its tensors."""

    kind = "models"
    what = "cached model weights"
    redo = "training the model again"

    def __init__(self, root: str | Path, name: str):
        super().__init__(root)
        self.name = name

    def path(self, key: str) -> Path:
        return self.root / f"{self.name}-{key_of(key)[:10]}.pt"


@register_model_source("builtin")
def builtin_model(name: str, context: ModelContext, seed: int | None = None) -> ModelAdapter:
    if name not in RECIPES:
        from oodbench.errors import did_you_mean

        raise OodbenchError(f"unknown built-in model '{name}'{did_you_mean(name, RECIPES)}; "
                            f"built-ins: {', '.join(RECIPES)}")
    images, labels, data = _training_data(context)
    key = model_weights_key_text(name, recipe_of(name, seed), RECIPE_VERSION, data)
    cache = WeightsCache(context.cache_dir, name)
    model = DigitsCNN()
    entry = cache.read(key)
    if entry is not None:
        model.load_state_dict(entry[0])
        model.eval()
    else:
        model = train(name, images, labels, seed)
        cache.write(key, model.state_dict(), {})
    return ModelAdapter(model, num_classes=6, identity=f"builtin:{name}:{key_of(key)[:10]}")


BUILTIN_MODELS = tuple(RECIPES)
