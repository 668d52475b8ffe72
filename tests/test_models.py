"""Every model source through its real loading path: architectures built with random
weights, saved to a temporary folder in the source's own layout, loaded back through
`load_model`, and checked against the network's own forward; features and the
classifier agree with the logits (features @ W.T + b == logits). Bad checkpoints give
one clear line, through the API and through the CLI (exit 2, no traceback)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, load_model
from oodbench.models import cifar_resnet, openood

X32 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def context(tmp_path) -> ModelContext:
    return ModelContext(cache_dir=tmp_path / "cache", data_root=tmp_path / "data")


def randomize_batch_norm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so that a BN buffer lost in loading would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return net.eval()


def assert_adapter_matches(adapter: ModelAdapter, reference_logits: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        features, logits = adapter.features(x)
        forward = adapter(x)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward, logits)
    weight, bias = adapter.fc
    assert features.shape == (len(x), weight.shape[1])
    torch.testing.assert_close(features @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)


def normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# ------------------------------------------------------------------ cifar_resnet


# Parameter counts from He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                           ("resnet56", 0.85), ("resnet110", 1.7)])
def test_cifar_resnet_depths_match_the_paper(name, millions):
    net = cifar_resnet.build(name)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.03
    convolutions = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) + 1 == 6 * cifar_resnet.BLOCKS_PER_STAGE[name] + 2  # option A: no shortcut convs


def test_cifar_resnet_loads_its_checkpoint_layout(tmp_path, context):
    torch.manual_seed(0)
    net = randomize_batch_norm(cifar_resnet.build("resnet20"))
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20-random.th"
    torch.save({"state_dict": state, "best_prec1": 12.5}, path)
    adapter = load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=str(path)), context)
    assert adapter.num_classes == 10 and adapter.outputs_probabilities is False
    with torch.no_grad():
        reference = net(normalized(X32, cifar_resnet.TRAINING_MEAN, cifar_resnet.TRAINING_STD))
    assert_adapter_matches(adapter, reference, X32)


def test_cifar_resnet_reads_the_class_count_from_the_checkpoint(tmp_path, context):
    net = randomize_batch_norm(cifar_resnet.build("resnet32", num_classes=100))
    path = tmp_path / "resnet32-c100.pt"
    torch.save(net.state_dict(), path)
    adapter = load_model(ModelSpec("cifar_resnet:resnet32", checkpoint=str(path)), context)
    assert adapter.num_classes == 100
    with torch.no_grad():
        reference = net(normalized(X32, cifar_resnet.TRAINING_MEAN, cifar_resnet.TRAINING_STD))
    assert_adapter_matches(adapter, reference, X32)


def test_cifar_resnet_shortcut_pads_new_channels_on_both_sides():
    block = cifar_resnet.BasicBlock(16, 32, stride=2)
    x = torch.randn(1, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (1, 32, 4, 4)
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2])


# ------------------------------------------------------------------ openood


def test_openood_resnet18_loads_best_ckpt(tmp_path, context):
    torch.manual_seed(1)
    net = randomize_batch_norm(openood.ResNet18_32x32(num_classes=100))
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 11.2) < 0.1  # ResNet-18 with a 100-way head
    run = tmp_path / "cifar100_resnet18_32x32_base_e100_lr0.1_default" / "s0"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "best.ckpt")
    adapter = load_model(ModelSpec("openood:resnet18_32x32", checkpoint=str(run / "best.ckpt")), context)
    assert adapter.num_classes == 100
    mean, std = openood.NORMALIZATION["cifar100"]  # chosen from the class count
    with torch.no_grad():
        reference = net(normalized(X32, mean, std))
    assert_adapter_matches(adapter, reference, X32)
    assert adapter.features(X32)[0].shape == (3, 512)


def test_openood_lenet_takes_grey_digits(tmp_path, context):
    torch.manual_seed(2)
    net = openood.LeNet(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "best.ckpt")
    adapter = load_model(ModelSpec("openood:lenet", checkpoint=str(tmp_path / "best.ckpt")), context)
    grey = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        reference = net((grey.expand(-1, 3, -1, -1) - 0.5) / 0.5)  # OpenOOD: grey -> RGB, 0.5 / 0.5
    assert_adapter_matches(adapter, reference, grey)
    assert adapter.features(grey)[0].shape == (4, 84)


def test_openood_unknown_architecture_and_dataset(tmp_path, context):
    with pytest.raises(OodbenchError, match="did you mean: lenet"):
        load_model(ModelSpec("openood:lenett", checkpoint=str(tmp_path / "x.ckpt")), context)
    torch.save(openood.LeNet().state_dict(), tmp_path / "best.ckpt")
    with pytest.raises(OodbenchError, match="unknown dataset 'mnsit'"):
        load_model(ModelSpec("openood:lenet", checkpoint=str(tmp_path / "best.ckpt"),
                             options={"dataset": "mnsit"}), context)



def test_official_release_is_one_model_per_seed_read_from_the_fetched_layout(tmp_path, context):
    """`openood:cifar10_resnet18` = OpenOOD's cifar10_res18_v1.5 release: seeds s0, s1, s2 from
    <data root>/openood_results/cifar10_resnet18_32x32_base_e100_lr0.1_default/s<N>/best.ckpt, a
    ResNet-18 32x32 with CIFAR-10's normalisation (the class count alone would also say CIFAR-10;
    the release says it for CIFAR-100's too)."""
    from oodbench.benchmark.config import load_config

    config = load_config({"benchmark": "cifar10", "models": ["openood:cifar10_resnet18"], "postprocessors": ["msp"]})
    assert [(m.display, m.model_label, m.member, m.options) for m in config.models] == [
        (f"openood:cifar10_resnet18 [s{n}]", "openood:cifar10_resnet18", f"s{n}", {"seed": f"s{n}"}) for n in range(3)]
    torch.manual_seed(3)
    net = randomize_batch_norm(openood.ResNet18_32x32(num_classes=10))
    run = context.data_root / "openood_results/cifar10_resnet18_32x32_base_e100_lr0.1_default/s1"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "best.ckpt")
    adapter = load_model(config.models[1], context)
    with torch.no_grad():
        reference = net(normalized(X32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    assert_adapter_matches(adapter, reference, X32)
    with pytest.raises(OodbenchError) as missing:
        load_model(config.models[0], context)
    assert str(missing.value) == (
        f"checkpoint not found: {run.parent / 's0' / 'best.ckpt'} (needed by openood:cifar10_resnet18 seed s0); get it "
        f"with `oodbench data fetch openood-v1.5/cifar10_res18_v1.5 --data-root {context.data_root}`")


def test_single_checkpoint_releases_and_explicit_checkpoints_stay_one_model(tmp_path, context):
    from oodbench.benchmark.config import load_config

    config = load_config({"benchmark": "cifar10", "postprocessors": ["msp"], "models": [
        "openood:mnist_lenet", {"name": "openood:cifar10_resnet18", "checkpoint": "mine.ckpt", "label": "mine"},
        {"name": "openood:cifar10_resnet18", "options": {"seed": "s2"}, "label": "s2"}]})
    assert [(m.member, m.checkpoint, m.options) for m in config.models] == [
        (None, None, {}), (None, "mine.ckpt", {}), (None, None, {"seed": "s2"})]
    with pytest.raises(OodbenchError, match="has no seed 's3'"):
        load_model(ModelSpec("openood:cifar10_resnet18", options={"seed": "s3"}), context)
    with pytest.raises(OodbenchError, match="'seed' picks a seed of an official release"):
        load_model(ModelSpec("openood:lenet", checkpoint="x.ckpt", options={"seed": "s0"}), context)
    with pytest.raises(OodbenchError, match="openood-v1.5/mnist_lenet"):
        load_model(ModelSpec("openood:mnist_lenet"), context)


def test_list_models_names_each_official_release_its_files_and_fetch_command(tmp_path):
    from oodbench.models.catalog import release_rows

    folder = tmp_path / "openood_results/cifar10_resnet18_32x32_base_e100_lr0.1_default"
    for seed in ("s0", "s1"):
        (folder / seed).mkdir(parents=True)
        (folder / seed / "best.ckpt").write_bytes(b"x")
    rows = {row[0]: row for row in release_rows(tmp_path)}
    assert rows["openood:cifar10_resnet18"] == [
        "openood:cifar10_resnet18", "s0, s1, s2", "2 of 3 found", f"{folder}/s*/best.ckpt",
        f"oodbench data fetch openood-v1.5/cifar10_res18_v1.5 --data-root {tmp_path}"]
    assert rows["openood:imagenet_resnet50"][2:] == [
        "not found", f"{tmp_path}/openood_results/pretrained_weights/resnet50-0676ba61.pth",
        f"oodbench data fetch openood-v1.5/resnet50_imagenet1k_v1 --data-root {tmp_path}"]

def test_openood_resnet50_is_torchvisions(context, tmp_path):
    """OpenOOD's ImageNet-1K model is torchvision's ResNet-50 (IMAGENET1K_V1), ImageNet normalisation."""
    from torchvision.models import resnet50

    torch.manual_seed(4)
    net = resnet50(num_classes=1000).eval()
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    adapter = load_model(ModelSpec("openood:resnet50", checkpoint=str(tmp_path / "resnet50.pth")), context)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = net(normalized(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert_adapter_matches(adapter, reference, x)

# ------------------------------------------------------------------ timm


def test_timm_model_from_a_local_file(tmp_path, context):
    import timm

    torch.manual_seed(3)
    net = randomize_batch_norm(timm.create_model("resnet10t", pretrained=False, num_classes=7))
    path = tmp_path / "resnet10t-7.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    adapter = load_model(ModelSpec("timm:resnet10t", checkpoint=str(path)), context)  # class count from the file
    assert adapter.num_classes == 7
    mean, std = net.pretrained_cfg["mean"], net.pretrained_cfg["std"]
    with torch.no_grad():
        reference = net(normalized(X32, mean, std))
    assert_adapter_matches(adapter, reference, X32)


def test_timm_never_downloads(context):
    with pytest.raises(OodbenchError, match="not in the local Hugging Face cache.*never downloads.*checkpoint"):
        load_model(ModelSpec("timm:resnet18", options={"pretrained": True, "cache_dir": "empty-hub-cache"}), context)
    with pytest.raises(OodbenchError, match="did you mean: resnet18"):
        load_model(ModelSpec("timm:resnet18x", checkpoint="x.pth"), context)


# ------------------------------------------------------------------ torch


MODEL_CODE = """
from torch import nn

class TinyNet(nn.Module):
    def __init__(self, hidden=16, num_classes=6):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
"""


def tiny_sequential() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 6)).eval()


def test_torch_whole_module_needs_trust(tmp_path, context):
    net = tiny_sequential()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(OodbenchError, match="needs full unpickling.*--trust-checkpoint"):
        load_model(ModelSpec(f"torch:{path}"), context)
    context.trust_checkpoint = True
    adapter = load_model(ModelSpec(f"torch:{path}"), context)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        reference = net(x)
    assert_adapter_matches(adapter, reference, x)


def test_torch_class_from_a_file_plus_state_dict(tmp_path, context):
    code = tmp_path / "my_model.py"
    code.write_text(MODEL_CODE)
    spec = importlib.util.spec_from_file_location("my_model_for_reference", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(5)
    net = module.TinyNet(hidden=12).eval()
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    model = ModelSpec(f"torch:{tmp_path / 'weights.pt'}",
                      options={"module": f"{code}:TinyNet", "kwargs": {"hidden": 12}, "mean": [0.5], "std": [0.25]})
    adapter = load_model(model, context)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        reference = net((x - 0.5) / 0.25)
    assert_adapter_matches(adapter, reference, x)
    with pytest.raises(OodbenchError, match="not a whole nn.Module.*module:"):
        load_model(ModelSpec(f"torch:{tmp_path / 'weights.pt'}"), context)
    wrong = ModelSpec(model.name, options={"module": f"{code}:TinyNet", "kwargs": {"hidden": 20}})
    with pytest.raises(OodbenchError, match="does not fit .*wrong shape"):
        load_model(wrong, context)


def test_unknown_option_is_one_clear_line(tmp_path, context):
    with pytest.raises(OodbenchError, match="unknown option 'chekpoint' \\(did you mean: checkpoint\\?\\)"):
        load_model(ModelSpec("cifar_resnet:resnet20", options={"chekpoint": "x"}), context)


# ------------------------------------------------------------------ bad checkpoints


def bad_checkpoints(folder) -> dict[str, tuple[str, str]]:
    """name -> (file, the part of the error line that says what is wrong)."""
    folder.mkdir(exist_ok=True)
    good = folder / "good.th"
    torch.save(cifar_resnet.build("resnet20").state_dict(), good)
    data = good.read_bytes()
    (folder / "truncated.th").write_bytes(data[: len(data) // 2])
    (folder / "page.pt").write_text("<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title>")
    torch.save(openood.LeNet().state_dict(), folder / "lenet.ckpt")
    torch.save(cifar_resnet.build("resnet20"), folder / "pickled.th")
    return {
        "truncated": (str(folder / "truncated.th"), "not a readable PyTorch checkpoint (truncated"),
        "html": (str(folder / "page.pt"), "is an HTML page, not a checkpoint"),
        "wrong architecture": (str(folder / "lenet.ckpt"), "does not fit cifar_resnet:resnet20"),
        "needs unpickling": (str(folder / "pickled.th"), "needs full unpickling"),
        "missing": (str(folder / "absent.th"), "checkpoint not found"),
    }


def test_bad_checkpoints_give_one_line_naming_the_file(tmp_path, context):
    for kind, (path, message) in bad_checkpoints(tmp_path / "bad").items():
        with pytest.raises(OodbenchError) as error:
            load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=path), context)
        text = str(error.value)
        assert message in text and path in text and "\n" not in text, (kind, text)
        if kind == "needs unpickling":
            assert "--trust-checkpoint" in text


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`oodbench ARGS...` in this process (the console script's own `main`): (exit code, stdout, stderr)."""
    import warnings

    from oodbench.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it; restore after
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def experiment(tmp_path, model: dict, **extra) -> str:
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"benchmark": "digits", "postprocessors": ["msp"], "search": False,
                                      "models": [model], **extra}))
    return str(config)


def test_bad_checkpoints_through_the_cli(monkeypatch, capsys, tmp_path, session_cache):
    for kind, (path, message) in bad_checkpoints(tmp_path / "bad").items():
        config = experiment(tmp_path, {"name": "cifar_resnet:resnet20", "checkpoint": path})
        code, _, err = run_main(monkeypatch, capsys, "run", config, "--results", tmp_path / "results.sqlite",
                                "--cache-dir", session_cache)
        errors = [line for line in err.splitlines() if line.startswith("oodbench: error:")]
        assert code == 2 and len(errors) == 1, (kind, err)
        assert message in errors[0] and path in errors[0], (kind, err)
        if kind == "needs unpickling":
            assert "--trust-checkpoint" in errors[0]


def test_trust_checkpoint_runs_a_whole_saved_model(monkeypatch, capsys, run_cli, tmp_path, session_cache):
    path = tmp_path / "whole.pt"
    torch.save(tiny_sequential(), path)
    model = {"name": f"torch:{path}", "label": "tiny"}
    code, _, err = run_main(monkeypatch, capsys, "run", experiment(tmp_path, model),
                            "--results", tmp_path / "refused.sqlite", "--cache-dir", session_cache)
    assert code == 2 and "--trust-checkpoint" in err
    trusted = run_cli("run", experiment(tmp_path, model), "--results", tmp_path / "trusted.sqlite",
                      "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr
    assert any(line.split()[:2] == ["tiny", "msp"] for line in trusted.stdout.splitlines()), trusted.stdout
    code, out, err = run_main(monkeypatch, capsys, "run", experiment(tmp_path, model, trust_checkpoint=True),
                              "--results", tmp_path / "config.sqlite", "--cache-dir", session_cache)
    assert code == 0 and any(line.split()[:2] == ["tiny", "msp"] for line in out.splitlines()), err


def test_list_models_shows_sources_and_the_robustbench_zoo(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "list", "models")
    assert code == 0, err
    for source in ("cifar_resnet", "openood", "timm", "robustbench", "torch"):
        assert source in out
    assert "cifar10 / corruptions" in out and "Diffenderfer2021Winning_LRR_CARD_Deck" in out


# ------------------------------------------------------------------ robustbench


@pytest.fixture(scope="module")
def robustbench_zoo():
    try:
        from oodbench.models.robustbench_source import import_robustbench

        _, zoo = import_robustbench()
    except OodbenchError as exc:
        pytest.skip(f"robustbench cannot be imported: {exc}")
    return zoo


def zoo_model(zoo, dataset: str, threat: str, name: str) -> nn.Module:
    entry = zoo.model_dicts[zoo.enums.BenchmarkDataset(dataset)][zoo.enums.ThreatModel(threat)][name]
    return entry["model"]().eval()


def test_robustbench_single_model_offline(robustbench_zoo, tmp_path, context):
    torch.manual_seed(6)
    net = randomize_batch_norm(zoo_model(robustbench_zoo, "cifar10", "corruptions", "Hendrycks2020AugMix_ResNeXt"))
    folder = tmp_path / "models" / "cifar10" / "corruptions"
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "Hendrycks2020AugMix_ResNeXt.pt")
    options = {"dataset": "cifar10", "threat_model": "corruptions", "model_dir": str(tmp_path / "models")}
    spec = ModelSpec("robustbench:Hendrycks2020AugMix_ResNeXt", options=options)
    adapter = load_model(spec, context)
    assert adapter.num_classes == 10 and not adapter.outputs_probabilities and not adapter.has_normalization
    with torch.no_grad():
        reference = net(X32)  # RobustBench models normalise inside and take [0,1] images
    assert_adapter_matches(adapter, reference, X32)

    (folder / "Hendrycks2020AugMix_ResNeXt.pt").write_text("<html><body>Too many users have viewed this file")
    with pytest.raises(OodbenchError, match="Hendrycks2020AugMix_ResNeXt.pt is an HTML page"):
        load_model(spec, context)
    spec.options["threat_model"] = "Linf"
    with pytest.raises(OodbenchError, match="no model 'Hendrycks2020AugMix_ResNeXt' for cifar10/Linf"):
        load_model(spec, context)


def test_robustbench_ensemble_outputs_probabilities(robustbench_zoo, tmp_path, context):
    """Chen2020Adversarial: three ResNet-50s averaging their softmax, like the CARD decks."""
    torch.manual_seed(7)
    ensemble = zoo_model(robustbench_zoo, "cifar10", "Linf", "Chen2020Adversarial")
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for i, member in enumerate(ensemble.models):
        torch.save(randomize_batch_norm(member, seed=i).state_dict(), folder / f"Chen2020Adversarial.pt_m{i}.pt")
    spec = ModelSpec("robustbench:Chen2020Adversarial", options={"model_dir": str(tmp_path / "models")})
    missing = folder / "Chen2020Adversarial.pt_m2.pt"
    missing.rename(folder / "moved.pt")
    with pytest.raises(OodbenchError, match="checkpoint not found: .*Chen2020Adversarial.pt_m2.pt"):
        load_model(spec, context)
    (folder / "moved.pt").rename(missing)

    adapter = load_model(spec, context)
    assert adapter.outputs_probabilities and adapter.num_classes == 10
    x = X32[:1]
    with torch.no_grad():
        features, logits = adapter.features(x)
        inputs = (x - ensemble.mu) / ensemble.sigma
        member_logits = torch.stack([member(inputs) for member in ensemble.models])
    torch.testing.assert_close(logits, member_logits.softmax(-1).mean(0).log(), rtol=1e-5, atol=1e-5)
    weight, bias = adapter.fc
    assert features.shape == (1, 3 * 2048) and weight.shape == (10, 3 * 2048)
    # an ensemble's features: all members' penultimate features; its head: the mean of their logits
    torch.testing.assert_close(features @ weight.T + bias, member_logits.mean(0), rtol=1e-4, atol=1e-4)


def test_robustbench_missing_is_clear_when_not_installed(monkeypatch):
    import sys

    from oodbench.models import robustbench_source

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # what Python does for a module that is absent
    with pytest.raises(OodbenchError, match=r"pip install 'oodbench\[robust\]'"):
        robustbench_source.import_robustbench()
    assert "oodbench[robust]" in robustbench_source.zoo_listing()
