"""oodbench from a notebook: your own model class and DataLoaders, no YAML.

The steps a notebook takes, on synthetic data (nothing to download; seconds on a CPU):

1. define a classifier with a latent-Gaussian head: ``forward`` returns the logits and sets
   ``self.mu`` / ``self.logvar`` (a ZClassifier-style model), and a plain softmax baseline;
2. train both briefly on "ID" images (a bright blob in one of four quadrants = the class);
3. ``oodbench.evaluate``: the leaderboard (FPR@95 / AUROC per OOD set) for MSP, energy,
   ViM and ``kl_gaussian`` (the KL of the latent Gaussian to N(0, I), read from the
   extras ``mu`` and ``logvar``);
4. ``oodbench.calibration``: accuracy, ECE, NLL and MSP AUROC under logit noise, latent
   model vs the softmax baseline;
5. ``oodbench.operating_point``: tau keeping 95% of ID validation, accuracy on accepted
   ID images, share of OOD rejected, with quadrant 3 held out as a pseudo-novel class;
6. ``oodbench.detector``: a fitted ViM detector, saved, loaded back, answering a class or
   -1 ("novel") for new images.

``kl_gaussian`` scores -KL(N(mu, sigma^2) || N(0, I)) (higher = more in-distribution): it
finds OOD images only when training keeps ID latents near the prior (a large
``kl_weight``). With the small weight used here the classes spread far from the prior and
noise lands near it, so its AUROC comes out low: the table says so rather than hiding it.

Run: ``python examples/notebook_style.py`` (``--tiny`` for the fast version the tests run).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oodbench

SIZE = 16  # images are 1 x 16 x 16, values in [0, 1]
CLASSES = 4


def blobs(count: int, seed: int, classes=range(CLASSES)) -> TensorDataset:
    """ID images: a bright square in the quadrant given by the label, on a noisy background."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(list(classes))[torch.randint(len(classes), (count,), generator=generator)]
    images = 0.2 * torch.rand(count, 1, SIZE, SIZE, generator=generator)
    half = SIZE // 2
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        offset = torch.randint(0, 3, (2,), generator=generator).tolist()
        top, left = row * half + offset[0], col * half + offset[1]
        images[index, :, top : top + half - 3, left : left + half - 3] += 0.7
    return TensorDataset(images.clamp(0, 1), labels)


def noise_sets(count: int, seed: int) -> dict[str, torch.Tensor]:
    """OOD images: Gaussian noise, uniform noise and horizontal stripes."""
    generator = torch.Generator().manual_seed(seed)
    stripes = torch.zeros(count, 1, SIZE, SIZE)
    stripes[:, :, ::4] = torch.rand(count, 1, 1, SIZE, generator=generator)
    return {"gaussian": (0.5 + 0.25 * torch.randn(count, 1, SIZE, SIZE, generator=generator)).clamp(0, 1),
            "uniform": torch.rand(count, 1, SIZE, SIZE, generator=generator),
            "stripes": stripes}


class LatentGaussianNet(nn.Module):
    """A CNN whose penultimate layer is a Gaussian latent: it classifies the mean mu and
    keeps mu and logvar as attributes for the KL score."""

    def __init__(self, latent: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                     nn.Flatten())
        self.to_mu, self.to_logvar = nn.Linear(64, latent), nn.Linear(64, latent)
        self.classifier = nn.Linear(latent, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        self.mu, self.logvar = self.to_mu(h), self.to_logvar(h)
        z = self.mu + torch.randn_like(self.mu) * (0.5 * self.logvar).exp() if self.training else self.mu
        return self.classifier(z)


class SoftmaxNet(nn.Module):
    """The baseline: the same encoder and a plain linear classifier."""

    def __init__(self):
        super().__init__()
        self.encoder = LatentGaussianNet().encoder
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def train(model: nn.Module, loader: DataLoader, epochs: int, kl_weight: float = 0.0) -> nn.Module:
    """Adam on cross-entropy (+ kl_weight * KL(q(z|x) || N(0, I)) for the latent model)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            if kl_weight:
                loss = loss + kl_weight * 0.5 * (model.mu ** 2 + model.logvar.exp() - model.logvar - 1).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(tiny: bool = False, cache_dir: str | None = None) -> dict:
    torch.manual_seed(0)  # the same weights on every run, so the output cache is reused
    torch.set_num_threads(1)  # a network this small trains fastest on one thread
    count, epochs = (240, 10) if tiny else (1200, 15)
    train_set, val_set, test_set = blobs(count, 0), blobs(count // 2, 1), blobs(count // 2, 2)
    ood, ood_val = noise_sets(count // 2, 3), noise_sets(count // 4, 4)
    loader = lambda data: DataLoader(data, batch_size=64, shuffle=True)  # noqa: E731
    latent = train(LatentGaussianNet(), loader(train_set), epochs, kl_weight=0.05)
    baseline = train(SoftmaxNet(), loader(train_set), epochs)
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="oodbench-example-")
    extras = {"mu": "mu", "logvar": "logvar"}  # attributes set in forward

    board = oodbench.evaluate(latent, loader(test_set), ood=ood, postprocessors=["msp", "ebo", "vim", "kl_gaussian"],
                              fit=loader(train_set), val=loader(val_set), ood_val=ood_val,
                              groups={"near": ["stripes"], "far": ["gaussian", "uniform"]}, extras=extras,
                              params={"vim": {"dim": 4}}, search=False, cache_dir=cache_dir)
    print(board[["postprocessor", "acc", "near-OOD|auroc", "far-OOD|auroc"]].round(4).to_string(index=False))

    noise = oodbench.calibration({"latent": latent, "softmax": baseline}, test_set, ood=ood,
                                 groups={"near": ["stripes"], "far": ["gaussian", "uniform"]},
                                 levels=[0.0, 0.5, 1.0] if tiny else None, cache_dir=cache_dir)
    print(noise.round(4).to_string(index=False))

    held_out = oodbench.operating_point(latent, test_set, ood=ood, postprocessor="msp", val=val_set,
                                        holdout_classes=[3], cache_dir=cache_dir)
    print(held_out.round(4).to_string(index=False))

    detector = oodbench.detector("vim", latent, fit=train_set, val=val_set, keep=0.95, params={"dim": 4},
                                 cache_dir=cache_dir)
    path = detector.save(Path(cache_dir) / "latent-vim.detector")
    loaded = oodbench.load_detector(path, latent)
    id_images = test_set.tensors[0][:8]
    answers = {"ID": loaded.predict(id_images).tolist(), "noise": loaded.predict(ood["uniform"][:8]).tolist()}
    print(f"{loaded}\nclasses of 8 ID images: {answers['ID']} (true: {test_set.tensors[1][:8].tolist()})\n"
          f"8 uniform-noise images: {answers['noise']} (-1 = novel)")
    return {"leaderboard": board, "calibration": noise, "operating_point": held_out, "detector": detector,
            "loaded": loaded, "answers": answers}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small data and short training (seconds)")
    parser.add_argument("--cache-dir", help="output cache (default: a temporary folder)")
    arguments = parser.parse_args()
    main(arguments.tiny, arguments.cache_dir)
