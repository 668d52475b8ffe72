"""ODIN, the PRO family and S&I against their algorithms written out independently here
(closed forms in NumPy, hand-written references in plain torch), on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from oodbench.benchmark.runner import run_experiment
from oodbench.benchmark.search import search_hyperparameters
from oodbench.errors import OodbenchError
from oodbench.models.adapter import ModelAdapter
from oodbench.postprocessors.base import Outputs, grid
from oodbench.registry import POSTPROCESSORS
from tests.conftest import digits_config

GRADIENT_METHODS = ["pro_msp", "pro_ent", "pro_msp_t", "pro_gen", "odin", "sni"]
PRO_METHODS = ["pro_msp", "pro_ent", "pro_msp_t", "pro_gen"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyResidualNet(nn.Module):
    """Two BatchNorms, an in-place ReLU, and a skip connection that spans the second BN."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(out.mean(dim=(2, 3)))


def tiny_net(seed: int = 0) -> TinyResidualNet:
    torch.manual_seed(seed)
    net = TinyResidualNet()
    for bn in (net.bn1, net.bn2):  # non-trivial eval statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    net.fc.weight.data.mul_(20)  # confident, distinct predictions
    return net.eval()


def tiny_adapter(seed: int = 0, **kwargs) -> ModelAdapter:
    return ModelAdapter(tiny_net(seed), num_classes=5, identity="test:tiny", mean=MEAN, std=STD, **kwargs)


def images(count: int = 12, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs_for(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> Outputs:
    with torch.no_grad():
        logits = model(x)
    return Outputs(logits=logits, model=model, inputs=TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
                   meta={"batch_size": batch_size})


def create(name: str, **params):
    return POSTPROCESSORS.get(name)(**params)


# ----------------------------------------------------------------- independent references


def softmax_np(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def base_score_np(name: str, logits: np.ndarray, params: dict) -> np.ndarray:
    if name == "pro_msp":
        return softmax_np(logits).max(axis=1)
    if name == "pro_msp_t":
        return softmax_np(logits / params["temperature"]).max(axis=1)
    p = softmax_np(logits)
    if name == "pro_ent":
        return (p * np.log(p)).sum(axis=1)
    top = -np.sort(-p, axis=1)[:, : min(params["top_m"], p.shape[1])]
    return -(top ** params["gamma"] * (1 - top) ** params["gamma"]).sum(axis=1)


# ------------------------------------------------------------------------------- PRO


@pytest.mark.parametrize("name", PRO_METHODS)
def test_pro_with_no_steps_is_its_base_score(name):
    model = tiny_adapter()
    x = images()
    method = create(name, K=0, eps=0.01)
    logits = model(x).detach().double().numpy()
    expected = base_score_np(name, logits, method.params)
    np.testing.assert_allclose(method.score(outputs_for(model, x)).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PRO_METHODS)
@pytest.mark.parametrize("eps", [1e-3, 5e-2])
def test_pro_never_exceeds_the_clean_score(name, eps):
    model = tiny_adapter()
    x = images(count=20)
    clean = create(name, K=0).score(outputs_for(model, x))
    perturbed = create(name, K=3, eps=eps).score(outputs_for(model, x))
    assert (perturbed <= clean).all()
    assert (perturbed < clean).any(), "a step this large should lower some scores"


def linear_softmax_model(seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6)).eval()
    weight, bias = net[1].weight.detach().double().numpy(), net[1].bias.detach().double().numpy()
    return net, weight, bias


@pytest.mark.parametrize("name", ["pro_msp", "pro_ent"])
def test_one_pro_step_on_a_linear_softmax_model_matches_the_closed_form(name):
    net, W, b = linear_softmax_model()
    model = ModelAdapter(net, num_classes=6, identity="test:linear")
    x = images(count=16, size=4, seed=3)
    eps = 0.05
    x0 = x.flatten(1).double().numpy()
    p = softmax_np(x0 @ W.T + b)
    # d p_c / d x = p_c (W_c - sum_k p_k W_k)
    centred = W[None, :, :] - np.einsum("nk,kd->nd", p, W)[:, None, :]
    if name == "pro_msp":  # grad max_c p_c = p_y (W_y - p^T W)
        top = p.argmax(axis=1)
        grad = p[np.arange(len(p)), top][:, None] * centred[np.arange(len(p)), top]
    else:  # grad sum_c p_c log p_c = sum_c p_c log p_c (W_c - p^T W)  (the +1 term sums to 0)
        grad = np.einsum("nc,ncd->nd", p * np.log(p), centred)
    x1 = x0 - eps * np.sign(grad)
    expected = np.minimum(base_score_np(name, x0 @ W.T + b, {}), base_score_np(name, x1 @ W.T + b, {}))
    score = create(name, K=1, eps=eps).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, base_score_np(name, x0 @ W.T + b, {})), "the step must change scores"


GRIDS = {
    "pro_msp": {"eps": [0.02, 0.001], "K": [5, 3, 0, 1]},
    "pro_ent": {"eps": [0.05], "K": [1, 7, 3]},
    "pro_msp_t": {"eps": [0.02, 0.005], "K": [2, 1], "temperature": [0.5, 10.0]},
    "pro_gen": {"eps": [0.02], "K": [3, 1], "gamma": [0.1, 2.0], "top_m": [3, 10, 100]},  # M >= 5 classes: one trajectory
    "odin": {"temperature": [1.0, 10.0, 1000.0], "eps": [0.0014, 0.0, 0.05]},
    "pro_msp_last": {"eps": [0.02, 0.001], "K": [3, 0, 1], "statistic": ["last", "min"],
                     "eps_units": ["pixel", "normalized"]},
    "pro_ebo": {"eps": [0.02], "K": [2, 1], "temperature": [1.0, 3.0]},
}


@pytest.mark.parametrize("name", GRIDS)
def test_score_grid_equals_each_combinations_own_score_exactly(name):
    """One trajectory of the largest K serves every K, one clean gradient every eps: the grid
    of a search gives bit for bit what each combination scores on its own."""
    model = tiny_adapter()
    x = images(count=13)
    combos = list(grid(GRIDS[name]))
    scores = create(name).score_grid(outputs_for(model, x, batch_size=5), combos)
    assert len(scores) == len(combos)
    for combo, score in zip(combos, scores):
        alone = create(name, **combo).score(outputs_for(model, x, batch_size=5))
        assert torch.equal(score, alone), combo
    assert len({tuple(s.tolist()) for s in scores}) > len(combos) // 2, "the combinations must differ"


class CountingNet(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.forwards = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.net(x)


@pytest.mark.parametrize("name, space, forwards", [
    # one clean pass; per eps the K-1 further gradient steps and the last score: 1 + 2 x 5
    ("pro_msp", {"eps": [0.02, 0.001], "K": [5, 3, 1]}, 11),
    ("pro_msp_t", {"eps": [0.02], "K": [2, 1], "temperature": [0.5, 10.0]}, 5),  # 1 + 2 temperatures x 2
    # one clean pass (a backward per T from it), one pass per (T, eps)
    ("odin", {"temperature": [1.0, 10.0, 1000.0], "eps": [0.0014, 0.0028]}, 7),
])
def test_a_search_grid_runs_the_model_only_as_often_as_it_must(name, space, forwards):
    counting = CountingNet(tiny_net())
    create(name).score_grid(outputs_for(counting, images(), batch_size=256), list(grid(space)))
    assert counting.forwards == forwards + 1  # + the forward pass of outputs_for


@pytest.mark.parametrize("name", ["pro_msp", "odin"])
def test_a_search_through_the_grid_chooses_what_scoring_each_combination_chooses(name):
    model = tiny_adapter()
    val = outputs_for(model, images(count=10, seed=4), batch_size=4)
    ood_val = [outputs_for(model, images(count=7, seed=5) * 0.3, batch_size=4),
               outputs_for(model, images(count=5, seed=6).pow(3), batch_size=4)]
    space = GRIDS[name]
    chosen, note = search_hyperparameters(POSTPROCESSORS.get(name), {}, space, val, ood_val, lambda method: None)
    best, expected = -np.inf, None
    for combo in grid(space):  # one combination at a time, as the search did before grids
        method = create(name, **combo)
        id_scores = method.score(val).double().numpy()
        ood_scores = np.concatenate([method.score(o).double().numpy() for o in ood_val])
        value = roc_auc_score(np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)],
                              -np.concatenate([id_scores, ood_scores]))
        if value > best:
            best, expected = value, combo
    assert chosen == expected and note is None


@pytest.mark.parametrize("params", [{"K": -1}, {"K": 1.5}, {"eps": -0.1}, {"eps": "big"}])
def test_bad_pro_hyperparameters_are_user_errors(params):
    with pytest.raises(OodbenchError):
        create("pro_msp", **params)


# ------------------------------------------------------------------------------ ODIN


def odin_reference(net: nn.Module, x: torch.Tensor, temperature: float, eps: float,
                   table: tuple[float, ...] | None = None) -> np.ndarray:
    """The original ODIN procedure, one image at a time, on the *normalised* image: the
    signed gradient (ge 0 -> +1) divided by the channel std, subtracted eps times; with `table`,
    OpenOOD v1.5's: divided by its per-dataset table's std instead of the model's."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD)
    divisor = std if table is None else torch.tensor(table)
    scores = []
    for image in x:
        normalised = ((image[None] - mean) / std.view(1, 3, 1, 1)).requires_grad_(True)
        out = net(normalised)
        loss = F.cross_entropy(out / temperature, out.argmax(dim=1))
        loss.backward()
        gradient = (torch.ge(normalised.grad, 0).float() - 0.5) * 2
        for channel in range(3):
            gradient[0][channel] = gradient[0][channel] / divisor[channel]
        perturbed = normalised.detach() - eps * gradient
        out = net(perturbed).detach().double().numpy() / temperature
        scores.append(softmax_np(out).max())
    return np.array(scores)


@pytest.mark.parametrize("temperature, eps", [(1.0, 0.01), (1000.0, 0.0014), (10.0, 0.0028)])
def test_odin_matches_the_original_procedure(temperature, eps):
    model = tiny_adapter()
    x = images()
    expected = odin_reference(tiny_net(), x, temperature, eps)
    score = create("odin", temperature=temperature, eps=eps).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5, atol=1e-7)
    without_step = create("odin", temperature=temperature, eps=0.0).score(outputs_for(model, x))
    assert not torch.allclose(score, without_step, rtol=0, atol=1e-9), "the step must change scores"


def test_odin_with_openoods_normalisation_table_matches_its_procedure():
    """input_std: OpenOOD's ODIN divides by its table's std (here ImageNet's, for a model
    normalised with CIFAR-10's), so the step on the [0,1] image is eps * std_c / table_c."""
    table = (0.229, 0.224, 0.225)
    model, x = tiny_adapter(), images()
    expected = odin_reference(tiny_net(), x, 10.0, 0.01, table)
    score = create("odin", temperature=10.0, eps=0.01, input_std=list(table)).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5, atol=1e-7)
    own = create("odin", temperature=10.0, eps=0.01).score(outputs_for(model, x))
    assert not torch.allclose(score, own, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------- S&I


def hand_split(net: TinyResidualNet, x: torch.Tensor):
    """(head, tail) pairs written by hand for the two BatchNorms of TinyResidualNet."""
    h = F.relu(net.bn1(net.conv1(x)))

    def tail1(z):
        hidden = F.relu(z)
        return net.fc(F.relu(net.bn2(net.conv2(hidden)) + hidden).mean(dim=(2, 3)))

    def tail2(z):
        return net.fc(F.relu(z + h).mean(dim=(2, 3)))

    return [(net.bn1(net.conv1(x)), tail1), (net.bn2(net.conv2(h)), tail2)]


def sni_reference(net: TinyResidualNet, x: torch.Tensor, eta: float, steps: int, layers=(0, 1)) -> np.ndarray:
    """S&I one image at a time with hand-split head/tail pairs."""
    scores = []
    for image in x:
        image = image[None]
        target = int(net(image).argmax())
        fractions = []
        for index in layers:
            z, tail = hand_split(net, image)[index]
            z = z.detach()
            product = torch.ones_like(z)
            for _ in range(steps):
                z = z.detach().requires_grad_(True)
                (grad_max,) = torch.autograd.grad(tail(z).max(), z)
                (grad_ce,) = torch.autograd.grad(F.cross_entropy(tail(z), torch.tensor([target])), z)
                product = product * grad_max
                z = z + eta * grad_ce.sign()
            nonzero = (product[0] != 0).double().numpy()  # C x H x W
            fractions.extend(nonzero.reshape(nonzero.shape[0], -1).mean(axis=1))
        scores.append(-np.mean(np.square(fractions)))
    return np.array(scores)


@pytest.mark.parametrize("eta, steps", [(0.001, 2), (0.5, 2), (0.5, 3)])
def test_sni_hooks_match_a_hand_split_network(eta, steps):
    net = tiny_net()
    model = ModelAdapter(tiny_net(), num_classes=5, identity="test:tiny")
    x = images()
    expected = sni_reference(net, x, eta, steps)
    score = create("sni", eta=eta, steps=steps).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-6, atol=1e-9)
    assert len(np.unique(expected)) > 1


def test_sni_named_layers_match_the_hand_split_of_that_layer():
    model = ModelAdapter(tiny_net(), num_classes=5, identity="test:tiny")
    x = images()
    score = create("sni", eta=0.5, layers=["bn2"]).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), sni_reference(tiny_net(), x, 0.5, 2, layers=(1,)), rtol=1e-6)


@pytest.mark.parametrize("layers, message", [(["bn3"], "bn3"), ([], "empty"), (["relu"], "runs 2 times")])
def test_sni_bad_layers_are_user_errors(layers, message):
    model = ModelAdapter(tiny_net(), num_classes=5, identity="test:tiny")
    with pytest.raises(OodbenchError, match=message):
        create("sni", layers=layers).score(outputs_for(model, images()))


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_batched_equals_one_at_a_time(name):
    model = tiny_adapter()
    x = images(count=13)
    params = {"K": 2, "eps": 0.02} if name.startswith("pro") else {}
    batched = create(name, **params).score(outputs_for(model, x, batch_size=5))
    single = torch.cat([create(name, **params).score(outputs_for(model, x[i : i + 1])) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_parameters_stay_frozen_and_get_no_gradients(name):
    net = tiny_net()  # a bare module whose parameters still require grad
    x = images()
    create(name).score(outputs_for(net, x, batch_size=4))
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


class Probabilities(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


@pytest.mark.parametrize("name", ["pro_msp", "pro_ent", "pro_msp_t", "pro_gen", "odin"])
def test_probability_output_models_score_like_their_logit_twins(name):
    x = images()
    logit_model = tiny_adapter()
    probability_model = ModelAdapter(Probabilities(tiny_net()), num_classes=5, identity="test:prob", mean=MEAN,
                                     std=STD, classifier="net.fc", outputs_probabilities=True)
    params = {"K": 2, "eps": 0.02} if name.startswith("pro") else {"temperature": 10.0}
    expected = create(name, **params).score(outputs_for(logit_model, x))
    torch.testing.assert_close(create(name, **params).score(outputs_for(probability_model, x)), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_missing_model_is_a_user_error(name):
    outputs = Outputs(logits=torch.zeros(3, 5))
    with pytest.raises(OodbenchError, match="needs outputs.model"):
        create(name).score(outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_runs_on_the_model_device(name):
    x = images()
    params = {"K": 2, "eps": 0.02} if name.startswith("pro") else {}
    expected = create(name, **params).score(outputs_for(tiny_adapter(), x))
    score = create(name, **params).score(outputs_for(tiny_adapter().cuda(), x))
    assert score.device.type == "cpu"
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-5)


def test_runner_searches_and_scores_gradient_methods_end_to_end(tmp_path, session_cache):
    """The runner's model path: val search (K for PRO, eps for ODIN), test scoring, one row each."""
    config = digits_config(tmp_path, postprocessors=["pro_msp", "odin", "sni"], search=True,
                           params={"pro_msp": {"eps": 0.005}, "odin": {"temperature": 1000}})
    frame = run_experiment(config, cache_dir=str(session_cache), data_root=str(session_cache), quiet=True)
    rows = frame.set_index("postprocessor")
    assert sorted(rows.index) == ["odin", "pro_msp", "sni"]
    assert (rows.status == "done").all(), rows[["status", "reason"]]
    params = {name: json.loads(rows.loc[name, "params"]) for name in rows.index}
    assert params["pro_msp"]["eps"] == 0.005 and params["pro_msp"]["K"] in (1, 2, 3, 5)
    assert params["odin"]["temperature"] == 1000 and params["odin"]["eps"] in (0.0014, 0.0028)
    assert np.isfinite(rows["uniform|auroc"].astype(float)).all()


def test_input_gradient_cells_draw_a_bar_that_counts_every_image_they_run(tmp_path, session_cache, monkeypatch):
    """Each input-gradient cell has its own bar (images/s and ETA need the right total): the
    search's passes over the capped validation splits, then the test splits."""
    from oodbench.benchmark import jobs

    bars = []

    class RecordingBar(jobs.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": open(tmp_path / "bars.txt", "a")})
            bars.append(self)

    monkeypatch.setattr(jobs, "tqdm", RecordingBar)
    config = digits_config(tmp_path, postprocessors=["msp", "pro_msp", "odin"], search=True, search_limit=40,
                           params={"pro_msp": {"eps": 0.005}})
    run_experiment(config, cache_dir=str(session_cache), data_root=str(session_cache), quiet=False)
    assert [bar.desc for bar in bars] == ["digits-cnn pro_msp", "digits-cnn odin"]  # none for msp
    for bar in bars:
        assert bar.unit == "img" and not bar.leave and bar.total > 0 and bar.n == bar.total, (bar.desc, bar.n, bar.total)


@pytest.mark.parametrize("name", PRO_METHODS)
def test_pro_records_float64_scores_so_saturated_samples_keep_their_order(name):
    """Logit margins 30 > 25 > 16 (10 classes): a float32 softmax ties the first two at 1.0;
    PRO's recorded scores (here K=0, the clean score) keep them apart, with the float64 values."""
    logits = torch.zeros(3, 10, 1, 1)
    logits[:, 0, 0, 0] = torch.tensor([30.0, 25.0, 16.0])
    identity = nn.Linear(10, 10)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(10))
        identity.bias.zero_()
    model = ModelAdapter(nn.Sequential(nn.Flatten(), identity), num_classes=10, identity="test:identity")
    params = {"temperature": 1.0} if name == "pro_msp_t" else {}
    method = create(name, K=0, **params)
    scores = method.score(outputs_for(model, logits))
    assert scores.dtype == torch.float64
    assert scores[0] > scores[1] > scores[2]
    expected = base_score_np(name, logits.flatten(1).double().numpy(), method.params)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)


# --------------------------------------------- PRO variants: last step, energy, units, GEN-ReAct


def energy_np(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1)
    return m + np.log(np.exp(logits - m[:, None]).sum(axis=1))


@pytest.mark.parametrize("name", ["pro_msp_last", "pro_ebo", "pro_ent_last"])
def test_one_step_of_the_last_step_and_energy_variants_matches_the_closed_form(name):
    """last: the score after the step (not the minimum); pro_ebo: Algorithm 1 on the energy,
    whose gradient is p^T W on a linear model."""
    net, W, b = linear_softmax_model(1)
    model = ModelAdapter(net, num_classes=6, identity="test:linear")
    x = images(count=16, size=4, seed=5)
    eps = 0.05
    x0 = x.flatten(1).double().numpy()
    p = softmax_np(x0 @ W.T + b)
    centred = W[None, :, :] - np.einsum("nk,kd->nd", p, W)[:, None, :]
    if name == "pro_msp_last":
        top = p.argmax(axis=1)
        grad = p[np.arange(len(p)), top][:, None] * centred[np.arange(len(p)), top]
        base = lambda f: softmax_np(f).max(axis=1)  # noqa: E731
    elif name == "pro_ent_last":
        grad = np.einsum("nc,ncd->nd", p * np.log(p), centred)
        base = lambda f: (softmax_np(f) * np.log(softmax_np(f))).sum(axis=1)  # noqa: E731
    else:
        grad = p @ W
        base = energy_np
    x1 = x0 - eps * np.sign(grad)
    after = base(x1 @ W.T + b)
    expected = np.minimum(base(x0 @ W.T + b), after) if name == "pro_ebo" else after
    score = create(name, K=1, eps=eps).score(outputs_for(model, x))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5, atol=1e-6)
    if name != "pro_ebo":
        assert (after > base(x0 @ W.T + b)).any() or (after < base(x0 @ W.T + b)).any()


def pro_reference_on_normalised_inputs(net: nn.Module, x: torch.Tensor, eps: float, steps: int,
                                       statistic: str) -> np.ndarray:
    """The PRO code's loop (pro2_msp / pro_msp), written out: the network takes the
    normalised tensor, which is what the steps perturb."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    data = ((x - mean) / std).clone()
    record = []
    for _ in range(steps):
        data.requires_grad_(True)
        conf = torch.softmax(net(data), dim=1).max(dim=1).values
        record.append(conf.detach().double())
        (grad,) = torch.autograd.grad(conf.mean(), data)
        data = data.detach() - eps * grad.sign()
    with torch.no_grad():
        record.append(torch.softmax(net(data).double(), dim=1).max(dim=1).values)
    stacked = torch.stack(record)
    return (stacked.min(dim=0).values if statistic == "min" else stacked[-1]).numpy()


@pytest.mark.parametrize("statistic", ["min", "last"])
def test_eps_in_normalised_units_follows_the_pro_code(statistic):
    """eps_units: normalized steps eps * std_c on the [0,1] image: the PRO code's step of eps on
    OpenOOD's normalised tensor (float32 model, so to float32 precision)."""
    model = tiny_adapter()
    x = images(count=10)
    eps, steps = 0.01, 3
    expected = pro_reference_on_normalised_inputs(tiny_net(), x, eps, steps, statistic)
    score = create("pro_msp", K=steps, eps=eps, statistic=statistic, eps_units="normalized")
    got = score.score(outputs_for(model, x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    pixel = create("pro_msp", K=steps, eps=eps, statistic=statistic).score(outputs_for(model, x)).numpy()
    assert not np.allclose(pixel, got, rtol=1e-6, atol=0), "the two units must step differently here"


def features_np(model: ModelAdapter, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        z, _ = model.features(x)
    W, b = model.fc
    return z.double().numpy(), W.double().numpy(), b.double().numpy()


def gen_np(logits: np.ndarray, gamma: float, m: int) -> np.ndarray:
    top = -np.sort(-softmax_np(logits), axis=1)[:, :m]
    return -(top**gamma * (1 - top) ** gamma).sum(axis=1)


def test_gen_react_matches_its_formula():
    model = tiny_adapter()
    train, test = images(count=30, seed=2), images(count=9, seed=3)
    z_train, _, _ = features_np(model, train)
    z, W, b = features_np(model, test)
    threshold = np.percentile(z_train.ravel(), 85)
    expected = gen_np(np.minimum(z, threshold) @ W.T + b, 0.5, 3)
    method = create("gen_react", percentile=85, gamma=0.5, top_m=3)
    fc = model.fc
    fit = Outputs(logits=model(train).detach(), features=torch.from_numpy(z_train).float(), fc=fc)
    method.fit(fit, fit)
    assert method.shaper_state["threshold"] == pytest.approx(threshold)
    got = method.score(Outputs(logits=model(test).detach(), features=torch.from_numpy(z).float(), fc=fc))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_pro_gen_react_steps_through_the_clipped_classifier():
    """K=0 is GEN-ReAct; one step follows the gradient through min(z, t), written out in torch."""
    model = tiny_adapter()
    train, x = images(count=30, seed=2), images(count=9, seed=3)
    z_train, _, _ = features_np(model, train)
    fit = Outputs(logits=model(train).detach(), features=torch.from_numpy(z_train).float(), fc=model.fc)
    threshold = float(np.percentile(z_train.ravel(), 90))
    W, b = model.fc

    def score_of(v):
        z, _ = model.features(v)
        probs = torch.softmax((z.clamp(max=threshold) @ W.T + b).double(), dim=1)
        top = probs.topk(3, dim=1).values
        return -(top**0.1 * (1 - top) ** 0.1).sum(dim=1)

    v = x.clone().requires_grad_(True)
    clean = score_of(v)
    (grad,) = torch.autograd.grad(clean.sum(), v)
    stepped = score_of(x - 0.05 * grad.sign()).detach()
    expected = torch.minimum(clean.detach(), stepped).numpy()
    results = []
    for steps in (0, 1):
        method = create("pro_gen_react", K=steps, eps=0.05, top_m=3)
        method.fit(fit, fit)
        results.append(method.score(outputs_for(model, x)).numpy())
    np.testing.assert_allclose(results[0], clean.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(results[1], expected, rtol=1e-4, atol=1e-6)
    assert (results[1] < results[0]).any()
