"""The methods that read intermediate layers or several predictions (gram, mds_ensemble,
rankfeat, iodin, adascale_a/l, ensemble, mc_dropout), each against its formula written
again here (NumPy, with torch only for the network's own forward and backward passes)
on a tiny fixed network; the layer rules and reductions; batched == one-shot; and one
small CLI run with a two-checkpoint model entry (one ensemble cell per entry) and cached
layer statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from oodbench.benchmark import reads
from oodbench.benchmark.reads import attach, ensure_statistics
from oodbench.errors import MissingExtras
from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec, load_model
from oodbench.models.layers import LayerStatistic, REDUCTIONS, extract_statistics, layer_names, stages, statistic
from oodbench.postprocessors.base import Outputs
from oodbench.postprocessors.gram import holdout_split
from oodbench.registry import POSTPROCESSORS

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
STD_NP = np.array(STD)[None, :, None, None]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())  # 4 x 8 x 8
        self.stage = nn.Sequential(nn.Conv2d(4, 40, 3, padding=1, stride=2), nn.ReLU())  # 40 x 4 x 4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(40, 5)

    def forward(self, x):
        return self.fc(self.pool(self.stage(self.stem(x))).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ModelAdapter(Tiny(), num_classes=5, identity="tiny", mean=MEAN, std=STD)


def images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale


def outputs_of(model, x: torch.Tensor, batch_size: int = 64) -> Outputs:
    labels = torch.arange(len(x)) % 5
    with torch.no_grad():
        features, logits = model.features(x)
    return Outputs(logits=logits, features=features, labels=labels, fc=model.fc, model=model,
                   inputs=TensorDataset(x, labels), meta={"batch_size": batch_size})


def head(model, x: torch.Tensor, upto: str) -> torch.Tensor:
    """The network by hand, up to a stage's output."""
    net = model.net
    out = net.stem((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    if upto == "stem":
        return out
    out = net.stage(out)
    return out if upto == "stage" else net.pool(out)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def logsumexp_np(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1)
    return m + np.log(np.exp(a - m[:, None]).sum(axis=1))


def fitted(name, train, val, **params):
    method = POSTPROCESSORS.get(name)(**params)
    if method.needs_fit:
        method.fit(train, val)
    return method


# ---------------------------------------------------------------- layers


def gram_np(fmap: np.ndarray, p: int) -> np.ndarray:
    """OpenOOD's G_p: the p-th powers' full Gram matrix summed over its rows' second index."""
    t = fmap.reshape(len(fmap), fmap.shape[1], -1).astype(np.float64) ** p
    g = (t @ t.transpose(0, 2, 1)).sum(axis=2)
    return np.sign(g) * np.abs(g) ** (1 / p)


def test_stage_rule_and_reductions(tiny):
    x = images(6, 1)
    assert [name for name, _ in stages(tiny, x)] == ["stem", "stage", "pool"]
    assert layer_names(tiny, "conv_relu", x) == ["stem.0", "stem.1", "stage.0", "stage.1"]
    fmap = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    f = fmap.numpy().reshape(4, 3, -1)
    np.testing.assert_allclose(REDUCTIONS["mean"](fmap, ()).numpy(), f.mean(axis=2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(REDUCTIONS["mean_var"](fmap, ()).numpy(),
                               np.c_[f.mean(axis=2), f.var(axis=2, ddof=1)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(REDUCTIONS["gram"](fmap, (1, 2, 3)).numpy(),
                               np.c_[gram_np(fmap.numpy(), 1), gram_np(fmap.numpy(), 2), gram_np(fmap.numpy(), 3)],
                               rtol=1e-9)
    extracted = extract_statistics(tiny, TensorDataset(x, torch.zeros(6)), [LayerStatistic("mean", "stages")], 4)
    for value, stage in zip(extracted["mean@stages"], ("stem", "stage", "pool")):
        np.testing.assert_allclose(value.numpy(), head(tiny, x, stage).mean(dim=(2, 3)).detach().numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_a_missing_statistic_without_the_model_is_one_line(tiny):
    bare = Outputs(logits=torch.zeros(2, 5))
    with pytest.raises(MissingExtras) as error:
        statistic(bare, LayerStatistic("gram", "conv_relu", (1,)), "gram")
    assert "\n" not in str(error.value) and "'gram'" in str(error.value)


# ---------------------------------------------------------------- GRAM


def test_gram_against_numpy(tiny):
    train, test = outputs_of(tiny, images(60, 3)), outputs_of(tiny, torch.cat([images(10, 4), images(10, 5, 3.0)]))
    method = fitted("gram", train, train, powers=[1, 2, 3])

    def maps(x):
        net = tiny.net
        c1 = net.stem[0]((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
        r1 = torch.relu(c1)
        c2 = net.stage[0](r1)
        return [m.detach().numpy() for m in (c1, r1, c2, torch.relu(c2))]

    labels = train.labels.numpy()
    held = holdout_split(train.labels).numpy()
    assert held.sum() == 5 and all(held[labels == c].sum() == 1 for c in range(5))

    def delta(low, high, v):
        return ((np.maximum(low - v, 0) / np.abs(low + 1e-6)).sum(-1)
                + (np.maximum(v - high, 0) / np.abs(high + 1e-6)).sum(-1))

    bounds, factors = {}, []
    for layer, fmap in enumerate(maps(images(60, 3))):
        held_dev = np.zeros(held.sum())
        for p in (1, 2, 3):
            g = gram_np(fmap, p)
            for c in range(5):
                rows = (labels == c) & ~held
                bounds[layer, p, c] = g[rows].min(axis=0), g[rows].max(axis=0)
            held_dev += [delta(*bounds[layer, p, labels[i]], g[i]) for i in np.flatnonzero(held)]
        assert held_dev.mean() > 0
        factors.append(held_dev.mean())
    probabilities = softmax_np(test.logits.double().numpy())
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    deviation = np.zeros(len(predicted))
    for layer, fmap in enumerate(maps(test.inputs.tensors[0])):
        for p in (1, 2, 3):
            g = gram_np(fmap, p)
            deviation += [delta(*bounds[layer, p, c], row) / factors[layer] for c, row in zip(predicted, g)]
    np.testing.assert_allclose(method.score(test).numpy(), -deviation / confidence, rtol=1e-5)


# ---------------------------------------------------------------- MDS-Ensemble


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_mds_ensemble_against_numpy(tiny, noise):
    x_train, x = images(60, 3), torch.cat([images(8, 4), images(8, 5, 2.0)])
    train = outputs_of(tiny, x_train)
    method = fitted("mds_ensemble", train, train, noise=noise, alpha=[1.0, 0.5, 2.0])
    labels = train.labels.numpy()
    total = np.zeros(len(x))
    for alpha, stage in zip((1.0, 0.5, 2.0), ("stem", "stage", "pool")):
        z = head(tiny, x_train, stage).mean(dim=(2, 3)).detach().double().numpy()
        mu = np.stack([z[labels == c].mean(axis=0) for c in range(5)])
        centred = z - mu[labels]
        precision = torch.from_numpy(np.linalg.pinv(centred.T @ centred / len(z)))
        mu = torch.from_numpy(mu)

        def gaussian(inputs):
            d = head(tiny, inputs, stage).mean(dim=(2, 3)).double()[:, None, :] - mu[None]
            return -0.5 * torch.einsum("nkd,de,nke->nk", d, precision, d)

        x0 = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(-gaussian(x0).max(dim=1).values.sum(), x0)
        perturbed = x - noise * torch.where(grad >= 0, 1.0, -1.0)
        total += alpha * gaussian(perturbed).max(dim=1).values.detach().numpy()
    np.testing.assert_allclose(method.score(outputs_of(tiny, x)).numpy(), total, rtol=1e-4)


class OpenOODStyleResNet(nn.Module):
    """OpenOOD's ResNet18_32x32 layout: the stem's ReLU is a function call, not a module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.layer1 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def openood_style():
    torch.manual_seed(1)
    net = OpenOODStyleResNet()
    with torch.no_grad():  # a BatchNorm with running statistics of its own, so the stem is not trivial
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 2.0)
    return ModelAdapter(net.eval(), num_classes=5, identity="openood-style", mean=MEAN, std=STD)


def test_stem_rule_reads_what_runs_before_the_first_block(openood_style, tiny):
    """A ResNet's stem is the first block's input (its functional ReLU included); when no layer
    runs before the first block (a LeNet's block1, the tiny net's stem) it is that block's output."""
    x = images(6, 1)
    assert layer_names(openood_style, "stem", x) == ["layer1:input"]
    assert layer_names(tiny, "stem", x) == ["stem"]
    (value,) = extract_statistics(openood_style, TensorDataset(x, torch.zeros(6)), [LayerStatistic("mean", "stem")],
                                  4)["mean@stem"]
    normalised = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = openood_style.net.stem(normalised).mean(dim=(2, 3))
    np.testing.assert_allclose(value.numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_mds_ensemble_with_openoods_defaults_follows_its_code(openood_style, noise):
    """The openood profile's MDS-Ensemble (layers: stem, input_std 0.5) against OpenOOD's
    get_Mahalanobis_scores written out on the normalised input: feature_list[0] = relu(bn1(conv1)),
    channel means, sign of the gradient of mean(-M(x, c*)), divided by 0.5, data - noise * that."""
    params = load_conventions_params("mds_ensemble")
    assert params == {"layers": "stem", "input_std": [0.5, 0.5, 0.5]}
    net = openood_style.net
    x_train, x = images(60, 3), torch.cat([images(8, 4), images(8, 5, 2.0)])
    train = outputs_of(openood_style, x_train)
    method = fitted("mds_ensemble", train, train, noise=noise, **params)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    z = net.stem((x_train - mean) / std).mean(dim=(2, 3)).detach().double().numpy()
    labels = train.labels.numpy()
    mu = np.stack([z[labels == c].mean(axis=0) for c in range(5)])
    centred = z - mu[labels]
    precision, mu = torch.from_numpy(np.linalg.pinv(centred.T @ centred / len(z))), torch.from_numpy(mu)

    def gaussian(data):
        d = net.stem(data).mean(dim=(2, 3)).double()[:, None, :] - mu[None]
        return -0.5 * torch.einsum("nkd,de,nke->nk", d, precision, d)

    data = ((x - mean) / std).requires_grad_(True)
    closest = gaussian(data).max(dim=1).values
    (grad,) = torch.autograd.grad(torch.mean(-closest), data)
    gradient = (torch.ge(grad, 0).float() - 0.5) * 2 / 0.5
    expected = gaussian(data.detach() - noise * gradient).max(dim=1).values.detach().numpy()
    np.testing.assert_allclose(method.score(outputs_of(openood_style, x)).numpy(), expected, rtol=1e-4)
    if noise:  # the paper's step (noise in pixels, the stages) differs
        paper = fitted("mds_ensemble", train, train, noise=noise, layers="stem")
        assert not np.allclose(paper.score(outputs_of(openood_style, x)).numpy(), expected, rtol=1e-4)


def load_conventions_params(name: str) -> dict:
    from oodbench.benchmark.conventions import load_conventions

    return load_conventions("openood").method_params(name, "cifar10")


# ---------------------------------------------------------------- RankFeat


def test_rankfeat_against_numpy(tiny):
    x = torch.cat([images(6, 4), images(6, 5, 2.0)])

    def without_rank_one(fmap):
        f = fmap.detach().double().numpy().reshape(len(fmap), fmap.shape[1], -1)
        u, s, vh = np.linalg.svd(f, full_matrices=False)
        return torch.from_numpy(f - s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])).float().reshape(fmap.shape)

    net = tiny.net
    stem = head(tiny, x, "stem")
    from_stem = net.fc(net.pool(net.stage(without_rank_one(stem))).flatten(1))
    from_stage = net.fc(net.pool(without_rank_one(net.stage(stem))).flatten(1))
    mean = ((from_stem + from_stage) / 2).detach().double().numpy()
    for temperature in (1.0, 2.0):
        expected = temperature * logsumexp_np(mean / temperature)
        got = POSTPROCESSORS.get("rankfeat")(temperature=temperature).score(outputs_of(tiny, x))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


# ---------------------------------------------------------------- I-ODIN


def test_iodin_against_numpy(tiny):
    x = torch.cat([images(6, 4), images(6, 5, 2.0)])
    for temperature, eps in ((1000.0, 0.0014), (10.0, 0.05)):
        x0 = x.clone().requires_grad_(True)
        logits = tiny(x0)
        loss = nn.functional.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x0)
        g = grad.numpy()
        entry = (np.abs(g) * STD_NP).reshape(len(g), -1).argmax(axis=1)
        step = np.zeros_like(g).reshape(len(g), -1)
        step[np.arange(len(g)), entry] = np.where(g.reshape(len(g), -1)[np.arange(len(g)), entry] >= 0, 1, -1)
        with torch.no_grad():
            moved = tiny(x - eps * torch.from_numpy(step.reshape(g.shape))).double().numpy()
        expected = softmax_np(moved / temperature).max(axis=1)
        got = POSTPROCESSORS.get("iodin")(temperature=temperature, eps=eps).score(outputs_of(tiny, x))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_iodin_with_openoods_std_follows_its_code(tiny):
    """The openood profile's I-ODIN (ODIN's table std, here CIFAR-10's for a model normalised
    otherwise) against IODINPostprocessor.postprocess on the normalised input: the entry of
    largest |grad|, its sign divided by the table's std, data - noise * that."""
    table = load_conventions_params("iodin")["input_std"]
    assert table == [0.2470, 0.2435, 0.2616]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = torch.cat([images(6, 4), images(6, 5, 2.0)])
    for temperature, eps in ((1000.0, 0.0014), (10.0, 0.05)):
        data = ((x - mean) / std).requires_grad_(True)
        output = tiny.net(data)
        loss = nn.functional.cross_entropy(output / temperature, output.detach().argmax(dim=1))
        (grad,) = torch.autograd.grad(loss, data)
        flat = grad.abs().view(len(x), -1)
        mask = torch.zeros_like(flat).scatter_(1, flat.argmax(dim=1, keepdim=True), 1).view(grad.shape)
        gradient = (torch.ge(grad, 0).float() - 0.5) * 2 / torch.tensor(table).view(1, 3, 1, 1)
        with torch.no_grad():
            moved = tiny.net(data.detach() - eps * gradient * mask).double().numpy()
        expected = softmax_np(moved / temperature).max(axis=1)
        got = POSTPROCESSORS.get("iodin")(temperature=temperature, eps=eps, input_std=table).score(outputs_of(tiny, x))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
        own = POSTPROCESSORS.get("iodin")(temperature=temperature, eps=eps).score(outputs_of(tiny, x))
        assert not np.allclose(own.numpy(), expected, rtol=1e-7, atol=0)


# ---------------------------------------------------------------- AdaScale


@pytest.mark.parametrize("name", ["adascale_a", "adascale_l"])
def test_adascale_against_numpy(tiny, name):
    params = {"percentile": [60, 90], "k1": 10, "k2": 5, "lmbda": 10.0, "o": 0.05}
    x_val, x = images(40, 6), torch.cat([images(6, 4), images(6, 5, 2.0)])
    weight, bias = (t.double().numpy() for t in tiny.fc)

    def features_and_shifted(inputs):
        x0 = inputs.clone().requires_grad_(True)
        z, logits = tiny.features(x0)
        (grad,) = torch.autograd.grad(logits.max(dim=1).values.sum(), x0)
        g = grad.numpy()
        rank = (np.abs(g) * STD_NP).reshape(len(g), -1)
        count = int(rank.shape[1] * params["o"])
        mask = np.zeros_like(rank)
        np.put_along_axis(mask, np.argsort(rank, axis=1, kind="stable")[:, :count], 1.0, axis=1)
        moved = inputs + torch.from_numpy(0.5 * STD_NP * np.sign(g) * mask.reshape(g.shape)).float()
        with torch.no_grad():
            return z.detach().double().numpy(), tiny.features(moved)[0].double().numpy()

    def q(z, zp):
        k1, k2 = int(40 * 10 / 100), int(40 * 5 / 100)
        top1, top2 = np.argsort(-z, axis=1)[:, :k1], np.argsort(-z, axis=1)[:, :k2]
        return (np.take_along_axis(np.maximum(zp, 0), top1, 1).sum(1)
                + 10.0 * np.take_along_axis(np.abs(z - zp), top2, 1).sum(1))

    reference = np.sort(q(*features_and_shifted(x_val)))
    z, zp = features_and_shifted(x)
    cdf = np.searchsorted(reference, q(z, zp), side="right") / len(reference)
    p = 60 + (1 - cdf) * 30
    positive = np.maximum(z, 0)
    kept = (40 - np.round(40 * p / 100)).astype(int)
    top = np.array([np.sort(row)[::-1][:k].sum() for row, k in zip(positive, kept)])
    r = positive.sum(axis=1) / top
    if name == "adascale_a":
        logits = (z * np.exp(r)[:, None]) @ weight.T + bias
    else:
        logits = (z @ weight.T + bias) * (r ** 2)[:, None]
    val = outputs_of(tiny, x_val)
    got = fitted(name, val, val, **params).score(outputs_of(tiny, x))
    np.testing.assert_allclose(got.numpy(), logsumexp_np(logits), rtol=1e-5)


# ---------------------------------------------------------------- Ensemble, MC dropout


def test_ensemble_against_numpy():
    rng = np.random.default_rng(0)
    members = [rng.normal(size=(7, 4)) * 3 for _ in range(3)]
    outputs = Outputs(logits=torch.from_numpy(members[0]).float(),
                      extras={"checkpoint:s1": torch.from_numpy(members[1]).float(),
                              "checkpoint:s2": torch.from_numpy(members[2]).float()})
    stacked = np.stack([m.astype(np.float32).astype(np.float64) for m in members])
    np.testing.assert_allclose(POSTPROCESSORS.get("ensemble")().score(outputs).numpy(),
                               softmax_np(stacked.mean(axis=0)).max(axis=1), rtol=1e-6)
    averaged = np.mean([softmax_np(m) for m in stacked], axis=0).max(axis=1)
    np.testing.assert_allclose(POSTPROCESSORS.get("ensemble")(average="probabilities").score(outputs).numpy(),
                               averaged, rtol=1e-6)


def hash_np(seed: int, rows: np.ndarray, draw: int, units: int) -> np.ndarray:
    m = np.uint64(0xFFFFFFFF)
    x = ((rows.astype(np.uint64)[:, None] * np.uint64(0x2C1B3C6D) + np.uint64(draw * 0x297A2D39)
          + np.arange(units, dtype=np.uint64)[None, :] * np.uint64(0x1B873593) + np.uint64(seed * 0x61C88647)) & m)
    for multiplier in (0x7FEB352D, 0x5BD1E995):
        x = ((x ^ (x >> np.uint64(16))) * np.uint64(multiplier)) & m
    return (x ^ (x >> np.uint64(15))).astype(np.float64) / 2.0 ** 32


def test_mc_dropout_against_numpy():
    rng = np.random.default_rng(1)
    z, weight, bias = np.abs(rng.normal(size=(9, 16))), rng.normal(size=(4, 16)), rng.normal(size=4)
    outputs = Outputs(logits=torch.zeros(9, 4), features=torch.from_numpy(z).float(),
                      fc=(torch.from_numpy(weight).float(), torch.from_numpy(bias).float()))
    z, weight, bias = (a.astype(np.float32).astype(np.float64) for a in (z, weight, bias))
    rows = np.arange(9)
    logits = [(z * (hash_np(3, rows, t, 16) >= 0.3)) / 0.7 @ weight.T + bias for t in range(4)]
    got = POSTPROCESSORS.get("mc_dropout")(dropout_p=0.3, dropout_times=4, seed=3).score(outputs)
    np.testing.assert_allclose(got.numpy(), softmax_np(np.mean(logits, axis=0)).max(axis=1), rtol=1e-6)
    kept = (hash_np(0, np.arange(2000), 0, 100) >= 0.5).mean()  # the masks drop about p of the units
    assert abs(kept - 0.5) < 0.01
    halves = [POSTPROCESSORS.get("mc_dropout")().block_scores(outputs.features[s], torch.arange(9)[s],
                                                             *(t.double() for t in outputs.fc))
              for s in (slice(0, 4), slice(4, 9))]
    assert torch.equal(torch.cat(halves).float(), POSTPROCESSORS.get("mc_dropout")().score(outputs))


# ---------------------------------------------------------------- batched == one-shot


@pytest.mark.parametrize("name, params", [("rankfeat", {}), ("iodin", {}), ("mds_ensemble", {"noise": 0.01}),
                                          ("adascale_a", {"k1": 10, "k2": 5})])
def test_batched_equals_one_shot(tiny, name, params):
    x_val, x = images(30, 6), torch.cat([images(7, 4), images(6, 5, 2.0)])
    method = fitted(name, outputs_of(tiny, x_val), outputs_of(tiny, x_val), **params)
    one_shot = method.score(outputs_of(tiny, x, batch_size=64))
    batched = method.score(outputs_of(tiny, x, batch_size=4))
    torch.testing.assert_close(batched, one_shot, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the CLI


def test_cli_run_with_layer_statistics_and_a_two_checkpoint_entry(run_cli, tmp_path, session_cache):
    net = load_model(ModelSpec("digits-cnn"), ModelContext(session_cache, session_cache)).net
    generator = torch.Generator().manual_seed(1)
    torch.save(net.state_dict(), tmp_path / "s0.pt")
    torch.save({k: v + 0.01 * torch.randn(v.shape, generator=generator) if k.endswith("weight") else v
                for k, v in net.state_dict().items()}, tmp_path / "s1.pt")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({
        "benchmark": "digits", "search": False, "fit_split": "train", "results": str(tmp_path / "r.sqlite"),
        "models": [{"name": "torch:digits", "label": "pair", "options": {"module": "oodbench.models.digits:DigitsCNN"},
                    "checkpoints": [str(tmp_path / "s0.pt"), str(tmp_path / "s1.pt")]}],
        "postprocessors": ["gram", "ensemble", "rankfeat", "mc_dropout"]}))
    done = run_cli("run", config, "--limit", "30", "--format", "json", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    auroc = {(r["postprocessor"], r["checkpoint"]): r["value"] for r in rows
             if r["metric"] == "auroc" and r["dataset"] == "gaussian"}
    assert set(auroc) == {(m, c) for m in ("gram", "rankfeat", "mc_dropout") for c in ("s0", "s1")} \
        | {("ensemble", "s0+s1")}
    assert all(np.isfinite(v) for v in auroc.values())
    assert len(list((session_cache / "layers").rglob("*.pt"))) >= 2 * 5  # gram's, per checkpoint and split


def test_cached_statistics_are_not_extracted_again(tiny, tmp_path, monkeypatch):
    x = images(5, 1)
    stats = (LayerStatistic("mean", "stages"), LayerStatistic("gram", "conv_relu", (1, 2)))
    ensure_statistics(tiny, TensorDataset(x, torch.zeros(5)), "key", stats, tmp_path, 4, 0, "cpu")
    monkeypatch.setattr(reads, "extract_statistics", lambda *a, **k: pytest.fail("extracted again"))
    ensure_statistics(tiny, TensorDataset(x, torch.zeros(5)), "key", stats, tmp_path, 4, 0, "cpu")
    outputs = attach(Outputs(logits=torch.zeros(5, 5)), tmp_path, "key", stats, {})
    expected = head(tiny, x, "stage").mean(dim=(2, 3)).detach()
    torch.testing.assert_close(statistic(outputs, stats[0], "test")[1], expected)
    assert len(statistic(outputs, stats[1], "test")) == 4


def test_a_cell_reading_layer_statistics_is_keyed_by_their_code(tmp_path, session_cache, monkeypatch):
    """Changing how statistics are computed (LAYERS_VERSION) changes gram's cell key, not msp's."""
    from oodbench.benchmark import plan as plan_module
    from oodbench.benchmark.config import load_config
    from oodbench.datasets.benchmarks import load_benchmark
    from tests.conftest import digits_config

    config = load_config(digits_config(tmp_path, postprocessors=["gram", "msp"]), cache_dir=str(session_cache),
                         data_root=str(session_cache))
    plan = plan_module.Plan.resolve(config, load_benchmark("digits"), ["gram", "msp"])
    before = {name: plan.cell_fingerprint(name, "m", "w") for name in ("gram", "msp")}
    monkeypatch.setattr(plan_module, "LAYERS_VERSION", plan_module.LAYERS_VERSION + 1)
    assert plan.cell_fingerprint("gram", "m", "w") != before["gram"]
    assert plan.cell_fingerprint("msp", "m", "w") == before["msp"]
