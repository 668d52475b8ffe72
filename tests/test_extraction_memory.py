"""Extraction holds a few batches of decoded images, never a split: on image files read
through the real source and transform, sharded into the output cache, the images alive at
any moment stay within two batches whatever the split's size, with and without worker
processes; each batch's outputs go to their rows of the entry's file as they come."""

import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from oodbench.storage.caches import OutputCache
from oodbench.benchmark.extraction import extract
from oodbench.storage.entries import EntryFile
from oodbench.datasets.base import DatasetRef, load_dataset
from oodbench.datasets.transform import ImageSpec
from oodbench.models.adapter import ModelAdapter

BATCH = 4


class LiveImages(Dataset):
    """The split's items, counting the decoded image tensors alive (in this process)."""

    def __init__(self, base: Dataset):
        self.base, self.live, self.most, self.read = base, 0, 0, 0

    def __len__(self) -> int:
        return len(self.base)

    def _gone(self) -> None:
        self.live -= 1

    def __getitem__(self, index: int):
        image, label = self.base[index]
        self.live += 1
        self.read += 1
        self.most = max(self.most, self.live)
        weakref.finalize(image, self._gone)
        return image, label


class BatchesSeen(nn.Module):
    """A tiny network that records the largest input batch it was given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.largest = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, x.shape[0])
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index in range(48):
        path = root / "photos" / f"c{index % 2}" / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_extraction_holds_a_few_batches_of_images_not_the_split(folder, tmp_path, monkeypatch, workers):
    monkeypatch.setenv("OODBENCH_SHARD_SECONDS", "0")  # a shard per batch: the sharded path, written as it goes
    split = load_dataset(DatasetRef("image_folder", {"path": "photos"}), folder, ImageSpec(64, 3, 72, "bicubic", "x"))
    images = LiveImages(split)
    net = BatchesSeen()
    cache = OutputCache(tmp_path)
    syncs, disk = [], []

    def sync(entry) -> None:  # what the cache holds on disk at each shard
        syncs.append(entry.path)
        files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
        journal = next(p for p in files if p.suffix == ".journal").read_text().splitlines()
        assert len(journal) == len(syncs)  # its header, then a line per shard before this one
        disk.append(sum(p.stat().st_size for p in files if p.suffix != ".journal"))

    monkeypatch.setattr(EntryFile, "sync", sync)
    outputs = extract(ModelAdapter(net, num_classes=2, identity="tiny"), images, batch_size=BATCH,
                      num_workers=workers, cache=cache, key="split")
    assert len(outputs) == len(split) == 48 and outputs.features.shape == (48, 3)
    assert net.largest == BATCH  # the model never sees more than a batch
    if workers == 0:  # decoded in this process: count them
        assert images.read == 48 and images.most <= 2 * BATCH
    assert len(syncs) == 48 // BATCH and len(set(syncs)) == 1  # a shard per batch, all in the entry's one file
    assert OutputCache(tmp_path).load("split") is not None
    entries = list((tmp_path / "outputs").rglob("*"))
    assert [p.suffix for p in entries if p.is_file()] == [".pt"]  # no partial file or journal left
    entry = next(p for p in entries if p.is_file()).stat().st_size
    assert max(disk) <= entry  # the shards are the entry's own rows: the disk holds it once (and a journal)
