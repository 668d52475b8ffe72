"""The real checkpoints in ../shared/models load through their sources and reach the
accuracies measured in ../shared/DATA.md. The test images are read here with numpy
directly (the CIFAR-10 python pickle and the MNIST idx files), independently of
oodbench's dataset loaders."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, SHARED_MODELS, requires_shared
from oodbench.models.adapter import ModelContext, ModelSpec, load_model

pytestmark = requires_shared

# DATA.md: accuracy on the first 761 original-pixel CIFAR-10 test images.
CIFAR_RESNETS = {
    "resnet20": ("resnet20-12fca82f.th", 91.72),
    "resnet32": ("resnet32-d509ac18.th", 93.17),
    "resnet44": ("resnet44-014dd654.th", 93.82),
    "resnet56": ("resnet56-4bfd9763.th", 93.43),
}


@pytest.fixture(scope="module")
def cifar10_761():
    with open(SHARED_DATA / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255
    return images, torch.tensor(batch["labels"])


def _read_idx(path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


@pytest.fixture(scope="module")
def mnist_test():
    raw = SHARED_DATA / "MNIST" / "raw"
    images = _read_idx(raw / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(raw / "t10k-labels-idx1-ubyte.gz", 8)
    return torch.from_numpy(images.copy()).float() / 255, torch.from_numpy(labels.astype(np.int64))


def _context(tmp_path) -> ModelContext:
    return ModelContext(cache_dir=tmp_path, data_root=SHARED_DATA)


@pytest.mark.parametrize("name", sorted(CIFAR_RESNETS))
def test_cifar_resnet_checkpoint_reaches_measured_accuracy(name, cifar10_761, tmp_path):
    filename, expected = CIFAR_RESNETS[name]
    images, labels = cifar10_761
    assert len(labels) == 761
    model = load_model(ModelSpec(f"cifar_resnet:{name}", checkpoint=str(SHARED_MODELS / "cifar10" / filename)),
                       _context(tmp_path))
    with torch.inference_mode():
        features, logits = model.features(images)
    accuracy = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert abs(accuracy - expected) <= 0.5, f"{name}: {accuracy:.2f}% vs {expected}% in DATA.md"
    weight, bias = model.fc
    assert features.shape == (761, 64)
    torch.testing.assert_close(features @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)


def test_openood_mnist_lenet_accuracy(mnist_test, tmp_path):
    # The trainer reported 99.60% (on OpenOOD's own split); with OpenOOD v1.5's test
    # preprocessing (grey -> RGB, 0.5/0.5 normalisation) the official 10,000 test
    # images give 98.89% here. Below 98.5% means the architecture or preprocessing broke.
    images, labels = mnist_test
    checkpoint = SHARED_MODELS / "openood" / "mnist_lenet_acc99.60.ckpt"
    model = load_model(ModelSpec("openood:lenet", checkpoint=str(checkpoint)), _context(tmp_path))
    assert model.num_classes == 10
    with torch.inference_mode():
        features, logits = model.features(images)
        rgb_logits = model(images.expand(-1, 3, -1, -1))
    accuracy = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= 98.5, f"OpenOOD LeNet on MNIST test: {accuracy:.2f}%"
    torch.testing.assert_close(rgb_logits, logits)  # 1-channel input == OpenOOD's RGB-converted input
    weight, bias = model.fc
    torch.testing.assert_close(features @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)


def test_openood_osr_lenets_load_with_six_classes(tmp_path):
    for seed in range(1, 6):
        checkpoint = SHARED_MODELS / "openood" / f"osr_mnist6_seed{seed}.ckpt"
        model = load_model(ModelSpec("openood:lenet", checkpoint=str(checkpoint)), _context(tmp_path))
        assert model.num_classes == 6
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 6)


def test_openood_mds_ensemble_on_the_openood_lenet_follows_its_code(mnist_test, tmp_path):
    """The openood profile's MDS-Ensemble on OpenOOD's own MNIST LeNet (real weights, real MNIST
    test images as RGB, as OpenOOD reads them) against get_MDS_stat / get_Mahalanobis_scores
    written out: feature_list[0] = block1(x), its channel means, class means and tied precision
    on the fit images; sign of the gradient of mean(-M(x, c*)) on the normalised input, / 0.5,
    data - 0.0014 * that. The stem rule finds block1."""
    from torch.utils.data import TensorDataset

    from oodbench.benchmark.conventions import load_conventions
    from oodbench.models.layers import layer_names
    from oodbench.postprocessors.base import Outputs
    from oodbench.registry import POSTPROCESSORS

    images, labels = mnist_test
    rgb = images.expand(-1, 3, -1, -1).contiguous()
    fit_x, fit_y = rgb[:400], labels[:400]
    test_x = torch.cat([rgb[400:480], 1 - rgb[480:560]])  # ID digits and inverted (shifted) ones
    checkpoint = SHARED_MODELS / "openood" / "mnist_lenet_acc99.60.ckpt"
    model = load_model(ModelSpec("openood:lenet", checkpoint=str(checkpoint)), _context(tmp_path))
    assert layer_names(model, "stem", test_x) == ["block1"]
    params = load_conventions("openood").method_params("mds_ensemble", "mnist")
    method = POSTPROCESSORS.get("mds_ensemble")(**params)

    def outputs(x, y):
        with torch.no_grad():
            features, logits = model.features(x)
        return Outputs(logits=logits, features=features, labels=y, fc=model.fc, model=model,
                       inputs=TensorDataset(x, y), meta={"batch_size": 64})

    method.fit(outputs(fit_x, fit_y), outputs(fit_x, fit_y))
    got = method.score(outputs(test_x, torch.zeros(len(test_x), dtype=torch.long))).double().numpy()

    block1 = model.net.block1
    with torch.no_grad():
        z = block1(model.normalize(fit_x)).mean(dim=(2, 3)).double().numpy()
    y = fit_y.numpy()
    classes = np.unique(y)
    mu = np.stack([z[y == c].mean(axis=0) for c in classes])
    centred = z - mu[np.searchsorted(classes, y)]
    precision = torch.from_numpy(np.linalg.pinv(centred.T @ centred / len(z)))
    mu = torch.from_numpy(mu)

    def gaussian(data):
        d = block1(data).mean(dim=(2, 3)).double()[:, None, :] - mu[None]
        return -0.5 * torch.einsum("nkd,de,nke->nk", d, precision, d)

    data = model.normalize(test_x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.mean(-gaussian(data).max(dim=1).values), data)
    gradient = (torch.ge(grad, 0).float() - 0.5) * 2 / 0.5
    with torch.no_grad():
        expected = gaussian(data.detach() - 0.0014 * gradient).max(dim=1).values.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got[:80].mean() > got[80:].mean()  # the digits score as more ID than their inversions
