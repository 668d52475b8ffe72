"""S&I that computes each split layer's head once gives the same scores, bit for bit, as
the landed implementation that ran the whole network for every layer and step
(tests/sni_landed.py), on architectures with skip connections, in-place operations and
concatenations; and it really does skip the head."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import DenseNet, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from oodbench.models.adapter import ModelAdapter
from oodbench.models.cifar_resnet import TRAINING_MEAN, TRAINING_STD, build
from oodbench.postprocessors.sni import CallTrace, SplittingIntegrating
from tests.conftest import SHARED_DATA, SHARED_MODELS, requires_shared
from tests.sni_landed import landed_sni_score_batch
from tests.test_gradient_postprocessors import MEAN, STD, images, outputs_for, tiny_net


def varied_batchnorms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics, so that no channel is dead by construction."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(shape, generator=generator) * 0.6 - 0.3)
    return net.eval()


def adapter(net: nn.Module, num_classes: int = 10, mean=TRAINING_MEAN, std=TRAINING_STD) -> ModelAdapter:
    return ModelAdapter(net, num_classes=num_classes, identity="test:sni", mean=mean, std=std)


def cifar_resnet20() -> ModelAdapter:
    torch.manual_seed(0)
    return adapter(varied_batchnorms(build("resnet20")))


def torchvision_resnet(block=BasicBlock) -> ModelAdapter:
    """In-place ReLUs, ``out += identity``, max-pooling, downsample Sequentials."""
    torch.manual_seed(0)
    return adapter(varied_batchnorms(ResNet(block, [1, 1, 1, 1], num_classes=10)))


def small_densenet() -> ModelAdapter:
    """Every feature map feeds every later layer of its block through ``torch.cat``."""
    torch.manual_seed(0)
    return adapter(varied_batchnorms(DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                              bn_size=2, num_classes=10)))


MODELS = {
    "tiny-residual": lambda: ModelAdapter(tiny_net(), num_classes=5, identity="test:tiny", mean=MEAN, std=STD),
    "cifar-resnet20": cifar_resnet20,
    "torchvision-basic": torchvision_resnet,
    "torchvision-bottleneck": lambda: torchvision_resnet(Bottleneck),
    "densenet": small_densenet,
}


def new_scores(model: nn.Module, x: torch.Tensor, **params) -> torch.Tensor:
    return SplittingIntegrating(**params).score(outputs_for(model, x, batch_size=len(x)))


def assert_identical(model: nn.Module, x: torch.Tensor, **params) -> None:
    with torch.no_grad():
        expected = landed_sni_score_batch(model, x, **params)
    score = new_scores(model, x, **params)
    assert len(torch.unique(expected)) > 1, "scores should differ between images"
    assert torch.equal(score, expected), f"max abs difference {(score - expected).abs().max().item():.3g}"


SETTINGS = [(0.001, 2), (0.5, 3), (0.2, 1)]


@pytest.mark.parametrize("name, eta, steps", [(name, eta, steps) for name in sorted(MODELS) for eta, steps in SETTINGS
                                              if not (name == "torchvision-bottleneck" and steps == 3)])  # slow
def test_scores_are_identical_to_the_landed_implementation(name, eta, steps):
    size = {"tiny-residual": 6, "cifar-resnet20": 32, "densenet": 32}.get(name, 16)
    assert_identical(MODELS[name](), images(count=6, size=size, seed=2), eta=eta, steps=steps)


@pytest.mark.parametrize("layers", [["layer2.0.bn2"], ["layer3.2.conv1", "bn1", "layer1.1"]])
def test_named_layers_are_identical_to_the_landed_implementation(layers):
    """A convolution, a whole block and the stem BatchNorm, in an order unlike the network's."""
    assert_identical(cifar_resnet20(), images(count=6, size=32, seed=3), eta=0.01, steps=2, layers=layers)


@requires_shared
def test_real_resnet20_on_real_images_is_identical_to_the_landed_implementation():
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    model = load_model(ModelSpec("cifar_resnet:resnet20", checkpoint=str(SHARED_MODELS / "cifar10" /
                                                                        "resnet20-12fca82f.th")),
                       ModelContext(cache_dir=SHARED_DATA, data_root=SHARED_DATA))
    with open(SHARED_DATA / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        pixels = pickle.load(handle, encoding="latin1")["data"][:16]
    x = torch.from_numpy(np.asarray(pixels).reshape(-1, 3, 32, 32)).float() / 255
    assert_identical(model, x, eta=0.001, steps=2)


class CountingConv(nn.Conv2d):
    """Counts how often its convolution is actually computed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return super().forward(x)


def test_each_tail_pass_computes_only_the_layers_after_its_split():
    convs = [CountingConv(3 if i == 0 else 4, 4, 3, padding=1) for i in range(4)]
    norms = [nn.BatchNorm2d(4) for _ in convs]
    body = [module for conv, norm in zip(convs, norms) for module in (conv, norm, nn.ReLU())]
    net = varied_batchnorms(nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    model = ModelAdapter(net, num_classes=3, identity="test:counting")
    steps, outputs = 3, outputs_for(model, images(count=4, size=8))
    for conv in convs:
        conv.runs = 0
    SplittingIntegrating(steps=steps).score(outputs)
    # one clean pass for step 1 of every layer; then steps - 1 tail passes per split
    # (the BatchNorm after conv i), each computing only the convolutions after it
    assert [conv.runs for conv in convs] == [1 + (steps - 1) * i for i in range(4)]


def test_the_model_is_left_as_it_was():
    model = cifar_resnet20()
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    new_scores(model, images(count=3, size=32))
    assert all("forward" not in vars(module) for module in model.modules())
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == before


class IdentityThenInPlace(nn.Module):
    """An identity layer, whose output is its input, which an in-place ReLU then changes:
    replacing the identity's output by z (S&I's split) cuts that link."""

    def __init__(self):
        super().__init__()
        self.conv1, self.identity, self.conv2 = nn.Conv2d(3, 4, 3), nn.Identity(), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(x)
        out = self.identity(hidden)
        torch.relu_(hidden)
        return self.fc(torch.relu(self.conv2(out) + hidden).amax(dim=(2, 3)))


@pytest.mark.parametrize("layers", [["identity"], ["conv1", "identity"]])
def test_a_split_layer_whose_output_is_changed_in_place_later_is_identical(layers):
    torch.manual_seed(0)
    model = ModelAdapter(IdentityThenInPlace().eval(), num_classes=3, identity="test:alias")
    assert_identical(model, images(count=6, size=6), eta=0.3, steps=2, layers=layers)


def test_the_aliased_split_case_needs_its_own_first_step(monkeypatch):
    """Taking the identity's step-1 gradients from the clean pass would be wrong here."""
    torch.manual_seed(0)
    model = ModelAdapter(IdentityThenInPlace().eval(), num_classes=3, identity="test:alias")
    x = images(count=6, size=6)
    finish = CallTrace.finish

    def finish_treating_nothing_as_aliased(trace):
        finish(trace)
        trace.aliased = set()

    monkeypatch.setattr(CallTrace, "finish", finish_treating_nothing_as_aliased)
    with torch.no_grad():
        expected = landed_sni_score_batch(model, x, eta=0.3, layers=["identity"])
    assert not torch.equal(new_scores(model, x, eta=0.3, layers=["identity"]), expected)
