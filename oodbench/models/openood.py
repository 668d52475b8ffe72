"""OpenOOD v1.5 architectures loading OpenOOD checkpoints (``best.ckpt``, plain state dicts),
as ``openood:resnet18_32x32``, ``openood:resnet18_224x224``, ``openood:resnet50`` and
``openood:lenet`` with a ``checkpoint``; and OpenOOD's official checkpoints by name, as
``configs/releases/openood-v1.5.yaml`` lists them (``openood:cifar10_resnet18``,
``cifar100_resnet18``, ``imagenet200_resnet18``, ``imagenet_resnet50``, ``mnist_lenet``,
``osr_mnist6_seed<N>``), read from where ``oodbench data fetch`` unpacks them under the data
root. A release with training seeds (s0, s1, s2) is one model entry per seed (`members`:
one cell each, tables show mean ± std over them, OpenOOD's published form); a missing file
names the fetch command that gets it.

- ``resnet18_32x32``: ResNet-18 (He et al. 2016) adapted to 32x32 inputs, as OpenOOD
  trains it on CIFAR: a 3x3 stride-1 stem with 64 filters and no max-pooling, four
  stages of two basic blocks (64, 128, 256, 512 filters; stride 2 from the second
  stage on), projection shortcuts (1x1 convolution + batch norm, ``shortcut.0/1``) where
  the shape changes, global average pooling and ``fc``.
- ``resnet18_224x224``: the ImageNet ResNet-18 (torchvision's layout, which OpenOOD
  subclasses): a 7x7 stride-2 stem with 64 filters, batch norm, ReLU, 3x3 stride-2
  max-pooling, the same four stages with projection shortcuts named ``downsample.0/1``,
  global average pooling and ``fc``; OpenOOD's ImageNet-200 checkpoints (200 classes)
  and ImageNet-1K ones. It reads the benchmark's test transform (resize 256, crop 224).
- ``resnet50``: torchvision's ResNet-50 (OpenOOD's ImageNet-1K model is torchvision's
  IMAGENET1K_V1 weights, ``resnet50-0676ba61.pth``).
- ``lenet``: LeNet-5 (LeCun et al. 1998) for 28x28 digits: ``block1`` 5x5 convolution to
  6 maps with padding 2, ReLU, 2x2 max-pool; ``block2`` 5x5 to 16 maps, ReLU, max-pool;
  ``block3`` 5x5 to 120 maps (1x1), ReLU; ``classifier1`` 120 -> 84 + ReLU; ``fc``.
  OpenOOD builds it for 3 input channels and converts grey images to RGB, so a
  1-channel input is replicated to 3 channels here.

Input normalisation is OpenOOD's for the training set (``dataset`` option): CIFAR-10
(0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616), CIFAR-100 (0.5071, 0.4867, 0.4408) /
(0.2675, 0.2565, 0.2761), ImageNet(-200) (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); MNIST
is missing from OpenOOD's table, so it gets OpenOOD's fallback, 0.5 / 0.5 on every channel
(not the usual 0.1307 / 0.3081, with which the MNIST LeNet checkpoint loses 11 points of
accuracy). Without ``dataset``, LeNet means MNIST, ResNet-18 32x32 CIFAR-10 or CIFAR-100
and ResNet-18 224x224 ImageNet-200 or ImageNet, by the class count. The class count and
LeNet's input channels are read from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.models.adapter import ModelAdapter, ModelContext, register_model_source
from oodbench.models.checkpoints import (CheckpointError, checkpoint_path, extract_state_dict, load_weights,
                                         read_checkpoint)

NORMALIZATION = {
    "mnist": ((0.5,), (0.5,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet200": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18_32x32(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


class ImageNetBlock(nn.Module):
    """torchvision's BasicBlock: its parameter names, so OpenOOD's 224x224 checkpoints load."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18_224x224(nn.Module):
    def __init__(self, num_classes: int = 200):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(ImageNetBlock(in_planes, planes, stride), ImageNetBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(16, 120, 5), nn.ReLU())
        self.classifier1 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels == 3:  # OpenOOD feeds grey digits as RGB
            x = x.expand(-1, 3, -1, -1)
        out = self.block3(self.block2(self.block1(x))).flatten(1)
        return self.fc(F.relu(self.classifier1(out)))


def _default_dataset(name: str, num_classes: int) -> str:
    if name == "lenet":
        return "mnist"
    if name == "resnet50" and num_classes == 1000:
        return "imagenet"
    if name == "resnet18_224x224" and num_classes in (200, 1000):
        return "imagenet200" if num_classes == 200 else "imagenet"
    if num_classes in (10, 100):
        return f"cifar{num_classes}"
    raise OodbenchError(f"openood:{name} with {num_classes} classes: set the 'dataset' option "
                        f"({', '.join(NORMALIZATION)}) to choose OpenOOD's input normalisation")


def build(name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture `name`, sized by the checkpoint's classifier (and LeNet's first layer)."""
    classifier = state.get("fc.weight")
    num_classes = classifier.shape[0] if classifier is not None and classifier.dim() == 2 else 10
    if name == "lenet":
        stem = state.get("block1.0.weight")
        return LeNet(num_classes, stem.shape[1] if stem is not None and stem.dim() == 4 else 3)
    if name == "resnet50":
        from torchvision.models import resnet50

        return resnet50(num_classes=num_classes)
    return ResNet18_224x224(num_classes) if name == "resnet18_224x224" else ResNet18_32x32(num_classes)


ARCHITECTURES = ("resnet18_32x32", "resnet18_224x224", "resnet50", "lenet")
RELEASE = "openood-v1.5"


def _released():
    from oodbench.datasets.release import load_release

    return load_release(RELEASE)


def members(name: str) -> list[str]:
    """The training seeds of the official release `name` (one model entry each); [] otherwise."""
    model = _released().models.get(name)
    return list(model.seeds) if model else []


def locate(name: str, data_root: Path, seed: str | None = None) -> tuple[Path, str] | None:
    """(checkpoint file, the command that fetches it) of the official release `name` (and seed),
    or None for an architecture name (its checkpoint is the entry's own)."""
    release = _released()
    model = release.models.get(name)
    if model is None:
        return None
    files = model.checkpoints(data_root)
    if (seed or "") not in files:
        raise OodbenchError(f"openood:{name} has no seed '{seed}'{did_you_mean(str(seed), files)}; its seeds: "
                            f"{', '.join(files) or 'none (one checkpoint)'}")
    from oodbench.datasets.release import asset_spec

    return files[seed or ""], (f"oodbench data fetch {asset_spec(release, release.assets[model.asset])} "
                               f"--data-root {data_root}")


def check(name: str, checkpoint: str | None = None, dataset: str | None = None, seed: str | None = None):
    """The release model `name` names (None for an architecture), once the entry is one `openood`
    can load: a known architecture or release, a known dataset, a seed only for a release, a
    checkpoint for an architecture. OodbenchError otherwise (`oodbench validate` calls it)."""
    release = _released().models.get(name)
    if release is None and name not in ARCHITECTURES:
        known = [*ARCHITECTURES, *_released().models]
        raise OodbenchError(f"unknown OpenOOD architecture or release '{name}'{did_you_mean(name, known)}; "
                            f"choose one of {', '.join(known)}")
    if dataset is not None and dataset not in NORMALIZATION:
        raise OodbenchError(f"openood:{name}: unknown dataset '{dataset}'{did_you_mean(dataset, NORMALIZATION)}; "
                            f"choose one of {', '.join(NORMALIZATION)}")
    if release is None and seed is not None:
        raise OodbenchError(f"openood:{name}: 'seed' picks a seed of an official release (e.g. "
                            f"openood:cifar10_resnet18); give this architecture its 'checkpoint'")
    if release is None and checkpoint is None:
        checkpoint_path(None, f"openood:{name}")  # the one-line 'needs a checkpoint file'
    return release


@register_model_source("openood")
def openood(name: str, context: ModelContext, checkpoint: str | None = None,
            dataset: str | None = None, seed: str | None = None) -> ModelAdapter:
    """OpenOOD v1.5: an architecture + checkpoint (resnet18_32x32, resnet18_224x224, resnet50, lenet), or an
    official release by name (cifar10_resnet18, imagenet200_resnet18, ...; `oodbench data fetch openood-v1.5`)."""
    release = check(name, checkpoint, dataset, seed)
    what = f"openood:{name}" + (f" seed {seed}" if seed else "")
    if release is not None and checkpoint is None:
        path, command = locate(name, context.data_root, seed)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path} (needed by {what}); get it with `{command}`")
        checkpoint, dataset = str(path), dataset or release.dataset
    arch = release.architecture if release is not None else name
    path = checkpoint_path(checkpoint, what)
    state = extract_state_dict(read_checkpoint(path, trust=context.trust_checkpoint), path)
    net = load_weights(build(arch, state), state, path, what)
    num_classes = net.fc.out_features
    dataset = dataset or _default_dataset(arch, num_classes)
    mean, std = NORMALIZATION[dataset]
    return ModelAdapter(net, num_classes=num_classes, identity=f"openood:{arch}:{num_classes}:{dataset}",
                        mean=mean, std=std)


openood.members = members  # read by the config (one model entry per seed) and validate/reproduce
openood.locate = locate
openood.check = check
