"""ImageNet backbones offline: timm from a local file or a local Hugging Face cache,
torchvision architectures from a local weights file, RobustBench ImageNet corruptions
models from model_dir, OpenOOD's ImageNet-200 ResNet-18. Architectures are built with
random weights, saved in their real on-disk layout, and loaded through the model sources
and the CLI; each model's own test transform is checked against its library's pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from oodbench.cli import main
from oodbench.datasets.transform import ImageSpec, to_image_tensor
from oodbench.errors import OodbenchError
from oodbench.models.adapter import ModelContext, ModelSpec, load_model

TIMM_TAG = "test_efficientnet.r160_in1k"  # timm's own tiny test network: 160 px, crop_pct 0.875, bicubic


def context(tmp_path) -> ModelContext:
    return ModelContext(tmp_path / "cache", tmp_path)


def photo(seed: int = 0, size=(200, 170)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def own_spec(adapter) -> ImageSpec:
    return ImageSpec(224, 3).for_model(adapter.preprocessing)


def hub_cache(root, tag: str, state: dict) -> None:
    """A Hugging Face hub cache holding timm/<tag>'s model.safetensors, as the hub writes it."""
    from safetensors.torch import save_file

    repo = root / f"models--timm--{tag}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))


def test_timm_from_the_local_hub_cache_with_timms_own_transform(tmp_path, monkeypatch):
    import timm
    from timm.data import create_transform, resolve_data_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_TAG).eval()
    with pytest.raises(OodbenchError, match=r"not in the local Hugging Face cache: .*models--timm--test_efficientnet"
                                            r"\.r160_in1k/snapshots/<revision>/model\.safetensors"):
        load_model(ModelSpec(f"timm:{TIMM_TAG}", options={"pretrained": True, "cache_dir": str(tmp_path / "hub")}),
                   context(tmp_path))
    hub_cache(tmp_path / "hub", TIMM_TAG, reference.state_dict())
    hub = {"pretrained": True, "cache_dir": str(tmp_path / "hub")}
    adapter = load_model(ModelSpec(f"timm:{TIMM_TAG}", options=hub), context(tmp_path))
    assert adapter.preprocessing["size"] == 160 and adapter.preprocessing["resize"] == 182  # floor(160 / 0.875)
    assert adapter.preprocessing["interpolation"] == "bicubic"
    image = photo()
    pipeline = create_transform(**resolve_data_config({}, model=reference))
    with torch.no_grad():
        expected = reference(pipeline(image)[None])
        got = adapter(to_image_tensor(image, own_spec(adapter))[None])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    hub_cache(tmp_path / "other", TIMM_TAG, {"fc.weight": torch.zeros(3, 4)})  # another network's weights
    with pytest.raises(OodbenchError, match="timm:test_efficientnet.r160_in1k: the cached weights do not fit"):
        load_model(ModelSpec(f"timm:{TIMM_TAG}", options={"pretrained": True, "cache_dir": str(tmp_path / "other")}),
                   context(tmp_path))


def test_timm_checkpoint_and_transform_choice_through_the_cli(tmp_path, capsys):
    """Two entries of one 3-class checkpoint: timm's transform asked for, and the default (the
    benchmark's: the class count is not the tag's 1,000). Each reads the splits through its
    own transform (own output cache entries), and the caption says which."""
    import timm

    root = tmp_path / "data"
    for split, count in (("id", 6), ("ood", 4)):
        for index in range(count):
            folder = root / split / (f"c{index % 3}" if split == "id" else "")
            folder.mkdir(parents=True, exist_ok=True)
            photo(index + (100 if split == "ood" else 0)).save(folder / f"{index}.jpg")
    id_set = {"dataset": "image_folder", "options": {"path": "id"}}
    benchmark = {"name": "tiny_in", "version": 1, "image": {"size": 64, "channels": 3, "resize": 72},
                 "num_classes": 3, "id": {"val": id_set, "test": id_set},
                 "near": {}, "far": {"faces": {"dataset": "image_folder", "options": {"path": "ood"}}}}
    (tmp_path / "tiny_in.yaml").write_text(yaml.safe_dump(benchmark))
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=3).state_dict(), tmp_path / "net.pth")
    entry = {"name": "timm:test_efficientnet", "checkpoint": str(tmp_path / "net.pth")}
    config = {"benchmark": str(tmp_path / "tiny_in.yaml"), "data_root": str(root), "search": False,
              "models": [{**entry, "label": "bench"}, {**entry, "label": "own", "options": {"preprocessing": "model"}}],
              "postprocessors": ["msp"], "fit_split": "val", "results": str(tmp_path / "results.sqlite"),
              "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "experiment.yaml"), "--num-workers", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("Test transforms: resize 72 (bilinear), center crop 64 (the benchmark's) for bench; resize 182 "
            "(bicubic), center crop 160 (timm data config of test_efficientnet: crop_pct 0.875) for own") in out
    assert len(list((tmp_path / "cache" / "outputs").rglob("*.pt"))) == 2 * 2  # ID test + faces, per transform
    assert main(["run", str(tmp_path / "experiment.yaml")]) == 0  # the data did not change: nothing said (the
    # last model read it through its own transform: its outputs' keys differ, the data's do not), all reused
    assert "changed since" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "outputs").rglob("*.pt"))) == 2 * 2
    assert main(["run", str(tmp_path / "experiment.yaml"), "--num-workers", "-1"]) == 2
    assert "--num-workers must be 0 or a positive" in capsys.readouterr().err


def test_torchvision_weights_file_by_architecture_name(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    torch.manual_seed(0)
    reference = resnet18().eval()
    entry = ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = ModelSpec("torchvision:resnet18", options={"weights": "IMAGENET1K_V1"})
    with pytest.raises(OodbenchError, match=r"weights file not found: .*torch/hub/checkpoints/resnet18-f37072fd\.pth"):
        load_model(spec, context(tmp_path))
    saved = tmp_path / "torch" / "hub" / "checkpoints" / entry.url.rsplit("/", 1)[-1]
    saved.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), saved)
    for adapter in (load_model(spec, context(tmp_path)),  # torch's hub cache, by entry
                    load_model(ModelSpec("torchvision:resnet18", checkpoint=str(saved)), context(tmp_path))):  # by file
        assert adapter.preprocessing == {"size": 224, "resize": 256, "interpolation": "bilinear",
                                         "origin": "torchvision ResNet18_Weights.IMAGENET1K_V1"}
        image = photo(1)
        with torch.no_grad():
            torch.testing.assert_close(adapter(to_image_tensor(image, own_spec(adapter))[None]),
                                       reference(entry.transforms()(image)[None]), rtol=1e-4, atol=1e-4)
    other = tmp_path / "pixmix_resnet18.pth"  # a retrained network: no entry, the benchmark's transform
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, other)
    adapter = load_model(ModelSpec("torchvision:resnet18", checkpoint=str(other)), context(tmp_path))
    assert adapter.preprocessing is None and adapter.num_classes == 1000
    with pytest.raises(OodbenchError, match="unknown torchvision classifier 'resnet5'.*resnet50"):
        load_model(ModelSpec("torchvision:resnet5", checkpoint=str(other)), context(tmp_path))


def test_robustbench_imagenet_corruptions_model_from_model_dir(tmp_path):
    from oodbench.models.robustbench_source import import_robustbench

    _, zoo = import_robustbench()
    entries = zoo.model_dicts[zoo.enums.BenchmarkDataset("imagenet")][zoo.enums.ThreatModel("corruptions")]
    spec = ModelSpec("robustbench:Hendrycks2020AugMix",
                     options={"dataset": "imagenet", "threat_model": "corruptions", "model_dir": str(tmp_path)})
    with pytest.raises(OodbenchError, match=r"checkpoint not found: .*imagenet/corruptions/Hendrycks2020AugMix\.pt"):
        load_model(spec, context(tmp_path))
    torch.manual_seed(0)
    network = entries["Hendrycks2020AugMix"]["model"]()  # RobustBench's ResNet-50 behind its normalisation
    folder = tmp_path / "imagenet" / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.model.state_dict().items()}},
               folder / "Hendrycks2020AugMix.pt")
    adapter = load_model(spec, context(tmp_path))
    assert adapter.num_classes == 1000 and not adapter.outputs_probabilities
    assert adapter.preprocessing == {"size": 224, "resize": 256, "interpolation": "bilinear",
                                     "origin": "RobustBench Res256Crop224"}
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), network.eval()(x))
    with pytest.raises(OodbenchError, match="torchvision's pretrained network"):
        load_model(ModelSpec("robustbench:Standard_R50", options={"dataset": "imagenet", "threat_model": "corruptions",
                                                                  "model_dir": str(tmp_path)}), context(tmp_path))


def test_openood_imagenet200_resnet18_is_torchvisions_layout(tmp_path, capsys):
    from torchvision.models import resnet18

    from oodbench.models.catalog import OPENOOD_IMAGENET200

    torch.manual_seed(0)
    reference = resnet18(num_classes=200).eval()  # OpenOOD's ResNet18_224x224 subclasses it
    path = tmp_path / "results" / OPENOOD_IMAGENET200 / "s0" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    adapter = load_model(ModelSpec("openood:resnet18_224x224", checkpoint=str(path)), context(tmp_path))
    assert adapter.num_classes == 200 and adapter.preprocessing is None  # the benchmark's (OpenOOD's) transform
    assert "imagenet200" in adapter.identity
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), reference((x - mean) / std))
        features, _ = adapter.features(x)
    assert features.shape == (2, 512)

    assert main(["list", "models", "--openood-dir", str(tmp_path / "results"), "--model-dir", str(tmp_path / "m"),
                 "--hf-cache", str(tmp_path / "hub"), "--wide"]) == 0  # one line per model
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("openood:", "robustbench:", "timm:"))]
    found = [row for row in rows if row[0] == "openood:resnet18_224x224" and "found" in row and "not" not in row]
    assert len(found) == 1 and found[0][-1] == str(path)
    missing = [row for row in rows if row[0] == "robustbench:Hendrycks2020AugMix"]
    assert missing and missing[0][-1] == str(tmp_path / "m" / "imagenet" / "corruptions" / "Hendrycks2020AugMix.pt")
    assert any(row[0] == "timm:resnet50.a1_in1k" and "not" in row for row in rows)
    assert json.dumps(out)  # printable as it is
