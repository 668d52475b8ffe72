"""Per-model test transforms: resize-then-crop with a resize larger than the crop and other
interpolations, bit for bit torchvision's (and timm's / torchvision weights' own transform
pipelines, which are those), and their place in the split fingerprint."""

import numpy as np
import pytest
import torch
from PIL import Image

from oodbench.datasets.base import DatasetRef, load_dataset, split_fingerprint_of
from oodbench.datasets.transform import ImageSpec, to_image_tensor
from oodbench.errors import OodbenchError
from oodbench.file_state import FileState


def picture(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("source_size, size, resize", [
    ((120, 90), 56, 64),  # landscape, downscale: ImageNet's 256 -> 224 in small
    ((61, 97), 48, 55),  # portrait, odd sizes: timm's floor(size / crop_pct)
    ((20, 30), 32, 40),  # upscale
])
def test_resize_center_crop_equals_torchvision_bit_for_bit(interpolation, source_size, size, resize):
    from torchvision.transforms import functional as TF

    mode = getattr(TF.InterpolationMode, interpolation.upper())
    image = picture(source_size, seed=size)
    spec = ImageSpec(size, 3, resize, interpolation, origin="test")
    expected = TF.to_tensor(TF.center_crop(TF.resize(image, resize, interpolation=mode), [size, size]))
    assert torch.equal(to_image_tensor(image, spec), expected)
    pixels = TF.to_tensor(image)  # tensors: torch's (antialiased) interpolation, as torchvision's tensor Resize
    expected = TF.center_crop(TF.resize(pixels, resize, interpolation=mode, antialias=True), [size, size])
    assert torch.equal(to_image_tensor(pixels, spec), expected)


def test_timm_and_torchvision_weights_pipelines_are_these_transforms():
    """timm's eval transform (resolve_data_config -> create_transform) and a torchvision weights
    entry's ``transforms()`` are Resize + CenterCrop + ToTensor + Normalize: without the
    normalisation (the adapter's), the same tensors."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.models import ResNet50_Weights

    image = picture((300, 260), seed=1)
    config = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict())
    assert (config["input_size"], config["interpolation"], config["crop_pct"]) == ((3, 224, 224), "bicubic", 0.95)
    timm_pipeline = create_transform(**config)
    spec = ImageSpec(224, 3, 235, "bicubic", origin="timm")  # floor(224 / 0.95)
    normalised = (to_image_tensor(image, spec) - torch.tensor(config["mean"])[:, None, None]) / torch.tensor(
        config["std"])[:, None, None]
    torch.testing.assert_close(timm_pipeline(image), normalised, rtol=0, atol=1e-6)

    weights = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert (weights.resize_size, weights.crop_size) == ([232], [224])
    spec = ImageSpec(224, 3, 232, "bilinear", origin="torchvision")
    normalised = (to_image_tensor(image, spec) - torch.tensor(weights.mean)[:, None, None]) / torch.tensor(
        weights.std)[:, None, None]
    torch.testing.assert_close(weights(image), normalised, rtol=0, atol=1e-6)


def test_transform_key_names_resize_and_interpolation_and_keeps_old_keys():
    assert ImageSpec(32, 3).key() == ImageSpec(32, 3, 32, "bilinear", origin="model").key() == "3x32x32"
    keys = {ImageSpec(224, 3, resize, interpolation).key()
            for resize in (224, 232, 256) for interpolation in ("bilinear", "bicubic")}
    assert len(keys) == 6
    for bad, message in (({"interpolation": "lanczos"}, "not one of bilinear"), ({"resize": 200}, "smaller than")):
        with pytest.raises(OodbenchError, match=message):
            ImageSpec(224, 3, **bad)
    assert ImageSpec(224, 3).for_model(None) == ImageSpec(224, 3)
    own = ImageSpec(224, 1).for_model({"size": 160, "resize": 182, "interpolation": "bicubic", "origin": "timm"})
    assert own == ImageSpec(160, 1, 182, "bicubic", "timm")


def test_a_models_transform_reads_the_original_images_and_changes_the_split_fingerprint(tmp_path):
    """Under a model's own transform the source's resize_crop (the benchmark's) is left out:
    the image is resized from the original, and the split (so the output cache key) differs."""
    folder = tmp_path / "faces" / "a"
    folder.mkdir(parents=True)
    original = picture((90, 70), seed=3)
    original.save(folder / "x.png")
    ref = DatasetRef("image_folder", {"path": "faces", "resize_crop": [64, 48]})
    benchmark = ImageSpec(48, 3)
    model = ImageSpec(48, 3, 60, "bicubic", origin="timm data config")
    files = FileState(tmp_path)
    fingerprints = {}
    for spec in (benchmark, model, ImageSpec(48, 3, 64, "bilinear", origin="torchvision")):
        data = load_dataset(ref, tmp_path, spec)
        fingerprints[spec] = split_fingerprint_of(data, ref, False, files)
        if spec.origin:
            assert torch.equal(data[0][0], to_image_tensor(original, spec))
    assert len(set(fingerprints.values())) == 3
    benchmark_image = load_dataset(ref, tmp_path, benchmark)[0][0]  # resize_crop 64 -> 48, then nothing to do
    assert torch.equal(benchmark_image, to_image_tensor(original, ImageSpec(48, 3, 64)))


def test_the_caption_states_the_transform_that_ran(tmp_path, session_cache):
    """A benchmark whose sources resize 12 and crop 8 (as ImageNet's 256 -> 224) before the
    8x8 transform: the caption says resize 12, crop 8, not the no-op resize 8, crop 8."""
    import yaml

    from oodbench.benchmark.runner import run_experiment
    from oodbench.report.render import render_leaderboard

    for index in range(12):
        path = tmp_path / "data" / "mine" / f"c{index % 6}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture((16, 14), "L", seed=index).save(path)
    crop = {"dataset": "image_folder", "options": {"path": "mine", "resize_crop": [12, 8]}}
    bench = {"name": "cropped", "version": 1, "image": {"size": 8, "channels": 1}, "num_classes": 6,
             "id": {"test": crop}, "near": {"cropped_too": crop},
             "far": {"noise": {"dataset": "gaussian_noise", "options": {"count": 12}}}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    config = {"benchmark": str(tmp_path / "bench.yaml"), "data_root": str(tmp_path / "data"), "search": False,
              "models": ["digits-cnn"], "postprocessors": ["msp"], "results": str(tmp_path / "r.sqlite")}
    frame = run_experiment(config, quiet=True, cache_dir=str(session_cache))
    text = " ".join(render_leaderboard(frame).split())
    assert ("Test transform: resize 12 (bilinear), center crop 8 on the sets whose source crops them, resize 8 "
            "(bilinear), center crop 8 on the others (the benchmark's)") in text, text
    assert ImageSpec(8, 1).describe([(12, 8), (12, 8)]) == "resize 12 (bilinear), center crop 8"
    assert ImageSpec(8, 1, 10).describe([(12, 8)]) == ("resize 12 (bilinear), center crop 8, then resize 10 "
                                                       "(bilinear), center crop 8")
