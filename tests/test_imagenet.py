"""ImageNet-1K / ImageNet-200 benchmarks on tiny JPEGs in their real layouts: OpenOOD's
lists over images_largescale/ (and images_classic/ for Textures), and ImageNet's
val/<wnid>/*.JPEG folder, through the real CLI; the 256 -> 224 test transform against
torchvision's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from oodbench.datasets.benchmarks import BENCHMARK_DIR, load_benchmark
from oodbench.datasets.base import DatasetRef, load_dataset, load_source
from oodbench.datasets.files import resize_then_crop
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError

SPEC = ImageSpec(224, 3)
WNIDS = [f"n{index:08d}" for index in range(1000)]  # sorted, like the real ones

TINY_NET = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))
'''


def _jpeg(path, seed: int, size=(300, 260)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def test_resize_then_crop_is_torchvision_resize_256_center_crop_224():
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(224)])
    for size in [(300, 260), (260, 333), (500, 375), (224, 224)]:
        image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3),
                                                                          dtype=np.uint8))
        ours = np.asarray(resize_then_crop(image, 256, 224))
        assert ours.shape == (224, 224, 3)
        assert np.array_equal(ours, np.asarray(reference(image)))


def _in_mode(mode: str, seed: int, size=(53, 41)) -> Image.Image:
    """A noisy image in `mode`; RGBA and LA with a transparent white background (alpha 0) around
    an opaque, half-transparent and coloured middle."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode in ("RGBA", "LA"):
        pixels = np.asarray(rgb.convert("RGBA")).copy()
        pixels[:, :10] = (255, 255, 255, 0)
        pixels[:, 10:20, 3] = 128
        return Image.fromarray(pixels, "RGBA").convert(mode)
    if mode == "P":
        return rgb.quantize(colors=37)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode, suffix", [("RGBA", ".png"), ("P", ".png"), ("1", ".png"), ("LA", ".png"),
                                          ("L", ".png"), ("RGB", ".jpg")])
def test_benchmark_resize_crop_converts_to_rgb_before_resizing_as_torchvision(tmp_path, mode, suffix):
    """The benchmark's resize_crop on an RGBA, palette, 1-bit, LA (and L, RGB) file equals
    torchvision's Resize + CenterCrop + ToTensor on ``Image.open(p).convert("RGB")`` (OpenOOD's
    order: alpha dropped, then resized), bit for bit (issue 23, item 2)."""
    from torchvision import transforms

    folder = tmp_path / "mine"
    folder.mkdir()
    for seed in range(2):
        _in_mode(mode, seed, (53 + 20 * seed, 41)).save(folder / f"{seed}{suffix}")
    dataset = load_dataset(DatasetRef("image_folder", {"path": "mine", "resize_crop": [40, 32]}), tmp_path,
                           ImageSpec(32, 3))
    reference = transforms.Compose([transforms.Resize(40, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(32), transforms.ToTensor()])
    for index, path in enumerate(dataset.base.paths):
        with Image.open(path) as opened:
            expected = reference(opened.convert("RGB"))
        assert torch.equal(dataset[index][0], expected), f"{mode}: max difference " \
            f"{(dataset[index][0] - expected).abs().max().item() * 255:.0f}/255"


def test_imagenet_folder_labels_are_sorted_wnid_indices(tmp_path):
    for wnid in WNIDS:
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
    picked = {WNIDS[3]: 3, WNIDS[999]: 999, WNIDS[0]: 0}
    for seed, wnid in enumerate(picked):
        _jpeg(tmp_path / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{seed:08d}.JPEG", seed)
    data = load_source(DatasetRef("imagenet_folder", {"resize_crop": [256, 224]}), tmp_path, SPEC)
    assert sorted(data[i][1] for i in range(len(data))) == [0, 3, 999]
    assert data[0][0].size == (224, 224)
    (tmp_path / "imagenet" / "val" / WNIDS[5]).rmdir()
    with pytest.raises(OodbenchError, match="999 class folders, expected 1000"):
        load_source(DatasetRef("imagenet_folder"), tmp_path, SPEC)


def test_imagenet_folder_skips_hidden_folders_like_every_folder_source(tmp_path):
    """A .ipynb_checkpoints/ (or any dot-folder) beside the 1,000 wnid folders is skipped, not
    refused and not a class: the same rule as image_folder's (issue 23, item 1)."""
    for wnid in WNIDS:
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
    _jpeg(tmp_path / "imagenet" / "val" / WNIDS[7] / "ILSVRC2012_val_00000001.JPEG", 1)
    _jpeg(tmp_path / "imagenet" / "val" / ".ipynb_checkpoints" / "ILSVRC2012_val_00000002.JPEG", 2)
    (tmp_path / "imagenet" / "val" / WNIDS[7] / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"AppleDouble")
    data = load_source(DatasetRef("imagenet_folder"), tmp_path, SPEC)
    assert len(data) == 1 and data[0][1] == 7


@pytest.mark.parametrize("benchmark, listing", [("imagenet_fs", "imagenet/test_imagenet_c.txt"),
                                                ("imagenet200_fs", "imagenet200/test_imagenet200_c.txt")])
def test_fs_imagenet_c_is_only_converted_to_a_tensor_under_every_transform(tmp_path, benchmark, listing):
    """OpenOOD reads ImageNet-C with ImageNetCPreProcessor (ToTensor + Normalize): no resize or
    crop, also for a model that brings its own transform (issue 23, item 3). The model's
    normalisation happens in its adapter, so the tensor must be ToTensor's."""
    from torchvision.transforms import functional as TF

    lines = []
    for index in range(2):
        relative = f"imagenet_c/blur/5/{WNIDS[index]}/ILSVRC2012_val_{index:08d}.JPEG"
        _jpeg(tmp_path / "images_largescale" / relative, index, size=(224, 224))
        lines.append(f"{relative} {index}")
    (tmp_path / "benchmark_imglist" / listing).parent.mkdir(parents=True)
    (tmp_path / "benchmark_imglist" / listing).write_text("\n".join(lines) + "\n")
    spec = load_benchmark(benchmark)
    transforms = [spec.image, ImageSpec(224, 3, 256, "bilinear", origin="torchvision weights"),
                  ImageSpec(288, 3, 320, "bicubic", origin="timm data config")]
    for image in transforms:
        dataset = load_dataset(spec.csid["imagenet_c"], tmp_path, image)
        for index, path in enumerate(dataset.base.paths):
            with Image.open(path) as opened:
                assert torch.equal(dataset[index][0], TF.to_tensor(opened.convert("RGB"))), image
    with pytest.raises(OodbenchError, match="'as_is' must be true or false and goes without 'resize_crop'"):
        load_dataset(DatasetRef("imglist", {"list": f"benchmark_imglist/{listing}", "images": "images_largescale",
                                            "as_is": True, "resize_crop": [256, 224]}), tmp_path, spec.image)


def _openood_layout(root) -> dict[str, list[tuple[str, int]]]:
    """Tiny OpenOOD lists for every split of the imagenet benchmark; returns list -> entries."""
    entries = {}
    lists = root / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    for name in ("train_imagenet", "val_imagenet", "test_imagenet"):
        entries[name] = [(f"imagenet_1k/{name}/{WNIDS[c]}/img_{c}_{k}.JPEG", c) for c in (1, 7, 500, 998)
                         for k in range(2)]
    for name in ("val_openimage_o", "test_ssb_hard", "test_ninco", "test_inaturalist", "test_openimage_o"):
        entries[name] = [(f"{name.split('_', 1)[1]}/{name}_{k}.jpg", -1) for k in range(4)]
    entries["test_textures"] = [(f"texture/banded/banded_{k}.jpg", -1) for k in range(4)]
    seed = 0
    for name, rows in entries.items():
        images = root / ("images_classic" if name == "test_textures" else "images_largescale")
        for relative, _ in rows:
            _jpeg(images / relative, seed, (280 + seed % 40, 250))
            seed += 1
        (lists / f"{name}.txt").write_text("".join(f"{p} {label}\n" for p, label in rows))
    return entries


def _experiment(tmp_path, root, benchmark: str) -> Path:
    (tmp_path / "tiny_net.py").write_text(TINY_NET)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_net", tmp_path / "tiny_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.Tiny().state_dict(), tmp_path / "tiny.pt")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({
        "benchmark": benchmark, "data_root": str(root),
        "models": [{"name": "torch:tiny", "checkpoint": str(tmp_path / "tiny.pt"),
                    "options": {"module": f"{tmp_path / 'tiny_net.py'}:Tiny"}}],
        "postprocessors": ["msp", "knn"], "search": False, "fit_split": "train",
        "results": str(tmp_path / "results.sqlite")}))
    return config


def test_imagenet_openood_lists_through_cli(run_cli, tmp_path):
    root = tmp_path / "data"
    entries = _openood_layout(root)
    done = run_cli("run", _experiment(tmp_path, root, "imagenet"), "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("["):])
    datasets = {r["dataset"] for r in rows if r["postprocessor"] == "msp"}
    assert {"ssb_hard", "ninco", "inaturalist", "textures", "openimage_o"} <= datasets
    # the ID labels are the lists' (a tiny random net: accuracy is what the labels say it is)
    benchmark = load_benchmark("imagenet")
    test = load_source(benchmark.id_splits["test"], root, SPEC)
    assert [test[i][1] for i in range(len(test))] == [label for _, label in entries["test_imagenet"]]
    assert test[0][0].size == (224, 224)


def test_imagenet_val_folder_fallback_through_cli(run_cli, tmp_path):
    """No ID lists: ID val/test come from imagenet/val/<wnid>/ (the parts scaled down to
    the tiny folder); the OOD sets still read OpenOOD's lists."""
    root = tmp_path / "data"
    _openood_layout(root)
    for name in ("train_imagenet", "val_imagenet", "test_imagenet"):
        (root / "benchmark_imglist" / "imagenet" / f"{name}.txt").unlink()
    for wnid in WNIDS:
        (root / "imagenet" / "val" / wnid).mkdir(parents=True)
    for c in (2, 40, 600, 999):
        for k in range(4):
            _jpeg(root / "imagenet" / "val" / WNIDS[c] / f"ILSVRC2012_val_{c:05d}{k}.JPEG", 100 * c + k)
    raw = yaml.safe_load((BENCHMARK_DIR / "imagenet.yaml").read_text())
    folder = raw["definitions"]["val_folder"]
    assert folder["dataset"] == "imagenet_folder" and folder["parts"] == {"val": 5000, "test": "rest"}
    for split in ("val", "test"):
        fallback = raw["id"][split]["options"]["candidates"][1]
        fallback["parts"] = {"val": 8, "test": "rest"}
    raw["id"].pop("train")
    small = tmp_path / "imagenet_small.yaml"
    small.write_text(yaml.safe_dump(raw))
    benchmark = load_benchmark(str(small))
    test = load_source(benchmark.id_splits["test"], root, SPEC)
    assert sorted(test[i][1] for i in range(len(test))) == [2, 2, 40, 40, 600, 600, 999, 999]
    config = _experiment(tmp_path, root, str(small))
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "fit_split": "val"}))
    done = run_cli("run", config, "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("["):])
    assert {"id_test", "ssb_hard", "ninco", "inaturalist", "textures", "openimage_o"} <= {r["dataset"] for r in rows}
