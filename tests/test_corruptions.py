"""Covariate-shifted copies of ID test sets in their release layouts: CIFAR-10-C's .npy
files (severity blocks of 10,000 in test order) and ImageNet-C's
<corruption>/<severity>/<wnid>/ folders; read directly and through `oodbench data status`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from oodbench.datasets.base import DatasetRef, load_source
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError

PER = 4  # test images per severity in the tiny release


@pytest.fixture
def tiny_cifar_c(tmp_path):
    """CIFAR-10-C with 4 test images: pixel value = 10 * severity + index, labels 0..3 per block."""
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    values = np.array([10 * s + i for s in range(1, 6) for i in range(PER)], dtype=np.uint8)
    np.save(root / "fog.npy", np.broadcast_to(values[:, None, None, None], (5 * PER, 32, 32, 3)).copy())
    np.save(root / "labels.npy", np.tile(np.arange(PER, dtype=np.int64) * 2, 5))
    return tmp_path


def test_cifar_c_reads_one_severity_block_in_test_order(tiny_cifar_c):
    data = load_source(DatasetRef("cifar_c", {"corruption": "fog", "severity": 3}), tiny_cifar_c, ImageSpec(32, 3))
    assert [int(data[i][0][0, 0, 0]) for i in range(len(data))] == [30, 31, 32, 33]
    assert [data[i][1] for i in range(len(data))] == [0, 2, 4, 6]
    with pytest.raises(OodbenchError, match="severity must be 1..5"):
        load_source(DatasetRef("cifar_c", {"corruption": "fog", "severity": 6}), tiny_cifar_c, ImageSpec(32, 3))
    with pytest.raises(OodbenchError, match="snow"):
        load_source(DatasetRef("cifar_c", {"corruption": "snow", "severity": 1}), tiny_cifar_c, ImageSpec(32, 3))


@pytest.fixture
def tiny_imagenet_c(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for severity in (1, 5):
        for wnid in wnids:
            (tmp_path / "ImageNet-C" / "blur" / str(severity) / wnid).mkdir(parents=True)
        for c in (4, 900):
            Image.new("RGB", (224, 224), (severity, c % 256, 0)).save(
                tmp_path / "ImageNet-C" / "blur" / str(severity) / wnids[c] / "ILSVRC2012_val_1.JPEG")
    return tmp_path


def test_imagenet_c_labels_are_sorted_wnid_indices(tiny_imagenet_c):
    data = load_source(DatasetRef("imagenet_c", {"corruption": "blur", "severity": 5}), tiny_imagenet_c,
                       ImageSpec(224, 3))
    assert [data[i][1] for i in range(len(data))] == [4, 900]
    with pytest.raises(OodbenchError, match="ImageNet-C blur severity 3"):
        load_source(DatasetRef("imagenet_c", {"corruption": "blur", "severity": 3}), tiny_imagenet_c,
                    ImageSpec(224, 3))


def test_corruption_sources_through_data_status(run_cli, tiny_cifar_c, tmp_path):
    benchmark = tmp_path / "shifted.yaml"
    benchmark.write_text(yaml.safe_dump({
        "name": "shifted", "version": 1, "image": {"size": 32, "channels": 3}, "num_classes": 10,
        "id": {"test": {"dataset": "cifar_c", "options": {"corruption": "fog", "severity": 2}}},
        "near": {"fog5": {"dataset": "cifar_c", "options": {"corruption": "fog", "severity": 5}}}, "far": {}}))
    done = run_cli("data", "status", benchmark, "--data-root", tiny_cifar_c)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CIFAR-10-C/fog.npy severity 2 (4 images)" in done.stdout
    assert "CIFAR-10-C/fog.npy severity 5 (4 images)" in done.stdout
