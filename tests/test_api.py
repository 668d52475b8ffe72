"""The Python API against the harness and against formulas written out here.

- `oodbench.evaluate` on the built-in digits-cnn's network and the digits benchmark's splits
  as tensors gives exactly the numbers of `oodbench run` on digits; data as a DataLoader,
  a Dataset or tensors is one data set (one key, no second extraction); the output cache
  is reused until the weights or an image change (then exactly the affected splits are
  extracted again); the user's model comes back as it was lent;
- any output head: tuple / dict / dataclass outputs, extras from attributes set in forward,
  from layer hooks and from output entries; `kl_gaussian` against the closed form (and
  torch.distributions); single-logit binary models against sigmoid formulas;
- `oodbench.detector`: batch scores equal the harness's scores of a YAML run, the threshold
  keeps 95% of ID validation, predict says the class or -1, save / load (weights_only)
  round-trips, other weights are refused; for output-, feature- and input-gradient methods;
- the operating point per head (labels per head, held-out classes) against a direct
  computation, and `oodbench report --operating-point` on a two-head torch: model with
  holdout_classes on the benchmark's test split;
- examples/notebook_style.py runs on its tiny synthetic data; bad input is one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oodbench
import oodbench.registry
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.benchmark.jobs import get_model
from oodbench.benchmark.plan import benchmark_splits
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.errors import OodbenchError
from oodbench.metrics.detection import threshold_keeping
from oodbench.models.adapter import ModelAdapter, ModelContext, ModelSpec
from oodbench.postprocessors.base import Outputs
from oodbench.postprocessors.latent import kl_to_standard_normal
from tests.conftest import NOT_ON_DIGITS, REPO, digits_config

NEAR, FAR = ["digits_6_9"], ["textures", "gaussian", "uniform"]


@pytest.fixture(scope="module")
def digits(session_cache):
    """The built-in digits-cnn's network and every split of the digits benchmark as tensors."""
    benchmark = load_benchmark("digits")
    splits = benchmark_splits(benchmark, "train")
    tensors = {}
    for name, split in splits.items():
        dataset = load_dataset(split.ref, session_cache, benchmark.image, ood=split.ood)
        tensors[name] = (torch.stack([dataset[i][0] for i in range(len(dataset))]),
                         torch.tensor([dataset[i][1] for i in range(len(dataset))]))
    net = get_model(ModelSpec("digits-cnn"), ModelContext(session_cache, session_cache)).net
    ood = {name: tensors[f"{group}:{name}"][0] for group, names in (("near", NEAR), ("far", FAR)) for name in names}
    ood_val = {name: tensors[f"ood_val:{name}"][0] for name in NEAR + FAR}
    return SimpleNamespace(net=net, test=tensors["id:test"], val=tensors["id:val"], train=tensors["id:train"],
                           ood=ood, ood_val=ood_val, cache=session_cache)


def api_call(digits, methods, cache_dir, **options):
    return oodbench.evaluate(digits.net, digits.test, digits.ood, methods, fit=digits.train, val=digits.val,
                             ood_val=digits.ood_val, groups={"near": NEAR, "far": FAR}, cache_dir=str(cache_dir),
                             **options)


def metric_columns(frame):
    return ["acc"] + [c for c in frame.columns if "|" in c]


# ------------------------------------------------------------------ evaluate == oodbench run


@pytest.fixture(scope="module")
def yaml_run(digits, tmp_path_factory):
    """`oodbench run` on digits: searched ebo, vim and knn, fixed ODIN, msp; and its cached run."""
    folder = tmp_path_factory.mktemp("yaml")
    params = {"odin": {"temperature": 1000.0, "eps": 0.0014}}
    path = digits_config(folder, postprocessors=["msp", "ebo", "vim", "knn", "odin"], search=True, params=params)
    frame = oodbench.run(path, cache_dir=str(digits.cache), quiet=True)
    return SimpleNamespace(frame=frame, params=params, experiment=CachedExperiment.open(path, cache_dir=str(digits.cache)))


def test_evaluate_gives_the_numbers_of_the_yaml_run(digits, yaml_run, tmp_path):
    frame = api_call(digits, ["msp", "ebo", "vim", "knn", "odin"], tmp_path / "cache", params=yaml_run.params)
    expected = yaml_run.frame
    assert list(frame.postprocessor) == list(expected.postprocessor)
    assert metric_columns(frame) == metric_columns(expected)
    np.testing.assert_array_equal(frame[metric_columns(frame)].to_numpy(float),
                                  expected[metric_columns(expected)].to_numpy(float))
    assert list(frame.params) == list(expected.params)  # the same searched hyperparameters
    assert list(frame.setting) == list(expected.setting)
    assert frame.attrs["groups"] == expected.attrs["groups"]


def count_extractions(monkeypatch) -> list[str]:
    """Labels of the extractions the harness runs (one per model and split not in the cache)."""
    import oodbench.benchmark.jobs as jobs

    calls, original = [], jobs.extract

    def counting(model, dataset, *args, desc="extract", **kwargs):
        calls.append(desc.split(" ")[-1])
        return original(model, dataset, *args, desc=desc, **kwargs)

    monkeypatch.setattr(jobs, "extract", counting)
    return calls


def test_every_data_form_is_one_data_set_and_the_cache_is_reused(digits, tmp_path, monkeypatch):
    calls = count_extractions(monkeypatch)
    images, labels = digits.test
    first = oodbench.evaluate(digits.net, (images, labels), {"noise": digits.ood["gaussian"]}, ["msp", "mls"],
                              cache_dir=str(tmp_path))
    assert sorted(calls) == ["far:noise", "id:test"]
    forms = [DataLoader(TensorDataset(images, labels), batch_size=7, shuffle=True),
             TensorDataset(images, labels), (images.numpy(), labels.tolist()), (images.mul(255).round().byte(), labels)]
    for data in forms[:3]:
        calls.clear()
        again = oodbench.evaluate(digits.net, data, {"noise": digits.ood["gaussian"]}, ["msp", "mls"],
                                  cache_dir=str(tmp_path))
        assert calls == []  # the same content hash: the cached outputs
        np.testing.assert_array_equal(again[metric_columns(again)].to_numpy(float),
                                      first[metric_columns(first)].to_numpy(float))
    calls.clear()
    changed = digits.ood["gaussian"].clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]
    oodbench.evaluate(digits.net, digits.test, {"noise": changed}, ["msp"], cache_dir=str(tmp_path))
    assert calls == ["far:noise"]  # one image changed: that split only


def test_changed_weights_recompute_and_the_model_comes_back_as_lent(digits, tmp_path, monkeypatch):
    calls = count_extractions(monkeypatch)
    net = type(digits.net)()
    net.load_state_dict(digits.net.state_dict())
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    oodbench.evaluate(net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp"], cache_dir=str(tmp_path))
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm stats untouched
    calls.clear()
    oodbench.evaluate(net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp"], cache_dir=str(tmp_path))
    assert calls == []
    with torch.no_grad():
        net.fc.bias[0] += 1.0
    oodbench.evaluate(net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp"], cache_dir=str(tmp_path))
    assert sorted(calls) == ["far:noise", "id:test"]


class Normalising(nn.Module):
    """The digits network expecting normalised inputs: it undoes the normalisation first."""

    MEAN, STD = (0.3,), (0.4,)

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x * self.STD[0] + self.MEAN[0])


def test_normalization_is_applied_inside(digits, tmp_path):
    plain = oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp", "knn"],
                              val=digits.val, cache_dir=str(tmp_path))
    normalising = oodbench.evaluate(Normalising(digits.net), digits.test, {"noise": digits.ood["gaussian"]},
                                    ["msp", "knn"], val=digits.val, cache_dir=str(tmp_path),
                                    normalization=(Normalising.MEAN, Normalising.STD))
    np.testing.assert_allclose(normalising[metric_columns(normalising)].to_numpy(float),
                               plain[metric_columns(plain)].to_numpy(float), atol=1e-6)


def test_limit_samples_every_split_and_nothing_is_kept_alive(digits, tmp_path):
    from oodbench.api import data as api_data, models as api_models
    from oodbench.benchmark.jobs import _MODELS
    from oodbench.datasets import base
    from oodbench.storage.store import ResultStore

    store = tmp_path / "limited.sqlite"
    oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp"], limit=50,
                      store=str(store), cache_dir=str(tmp_path))
    rows = ResultStore(store, readonly=True).frame("datasets")
    assert set(rows.samples) == {50} and set(rows.dataset) == {"id:test", "noise"}
    assert not api_data._LIVE and not api_models._LIVE
    assert not [k for k in base._MEMO if k[1] == "python"]
    assert not [k for k in _MODELS if str(k[0]).startswith("python:")]


def test_all_runs_every_method_this_call_can_feed(digits, tmp_path):
    frame = oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, "all", limit=40,
                              cache_dir=str(tmp_path))
    registry = oodbench.registry.POSTPROCESSORS
    expected = {e.name for e in registry.entries() if not e.obj.needs_fit and not e.obj.needs_extras}
    assert set(frame.postprocessor) == expected and (frame.status == "done").all()


def test_a_plugin_file_ranks_beside_the_built_ins(digits, tmp_path):
    frame = oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp", "margin"],
                              plugins=[str(REPO / "tests" / "plugins" / "margin_plugin.py")], cache_dir=str(tmp_path))
    assert list(frame.postprocessor) == ["msp", "margin"] and (frame.status == "done").all()


def test_a_store_keeps_the_cells(digits, tmp_path):
    store = tmp_path / "api.sqlite"
    frame = oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp"], store=str(store),
                              cache_dir=str(tmp_path), benchmark="digits-tensors")
    from oodbench.storage.store import ResultStore

    cells = ResultStore(store, readonly=True).frame("cells", benchmark="digits-tensors")
    assert list(cells.postprocessor) == ["msp"] and list(cells.fingerprint) == list(frame.fingerprint)


# ------------------------------------------------------------------ any output head


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    hidden: torch.Tensor


class Wrapped(nn.Module):
    """The digits network returning its logits inside a tuple, a dict or a dataclass."""

    def __init__(self, net: nn.Module, form: str):
        super().__init__()
        self.net, self.form = net, form

    def forward(self, x):
        hidden = self.net.body(x)
        logits = self.net.fc(hidden)
        return {"tuple": (hidden, logits), "dict": {"hidden": hidden, "logits": logits},
                "dataclass": Prediction(logits, hidden)}[self.form]


@pytest.mark.parametrize("form,output", [("tuple", 1), ("dict", "logits"), ("dataclass", "logits"),
                                         ("dict", lambda out: out["logits"])])
def test_output_selects_the_logits(digits, tmp_path, form, output):
    plain = oodbench.evaluate(digits.net, digits.test, {"noise": digits.ood["gaussian"]}, ["msp", "knn"],
                              val=digits.val, cache_dir=str(tmp_path))
    wrapped = oodbench.evaluate(Wrapped(digits.net, form), digits.test, {"noise": digits.ood["gaussian"]},
                                ["msp", "knn"], val=digits.val, cache_dir=str(tmp_path), output=output)
    np.testing.assert_array_equal(wrapped[metric_columns(wrapped)].to_numpy(float),
                                  plain[metric_columns(plain)].to_numpy(float))


def test_an_unselected_tuple_output_is_one_line(digits, tmp_path):
    with pytest.raises(OodbenchError, match=r"returns a tuple of 2; choose the logits with output="):
        oodbench.evaluate(Wrapped(digits.net, "tuple"), digits.test, {"noise": digits.ood["gaussian"]},
                          cache_dir=str(tmp_path))
    with pytest.raises(OodbenchError, match=r"output='logit': .*did you mean: logits"):
        oodbench.evaluate(Wrapped(digits.net, "dict"), digits.test, {"noise": digits.ood["gaussian"]},
                          cache_dir=str(tmp_path), output="logit")


class LatentNet(nn.Module):
    """Classifies the mean of a latent Gaussian; sets self.mu / self.logvar in forward and
    also returns them in a dict (three ways to reach the same extras)."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.mu_layer, self.logvar_layer = nn.Linear(32, 5), nn.Linear(32, 5)
        self.fc = nn.Linear(5, 6)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.body(x)
        self.mu, self.logvar = self.mu_layer(h), self.logvar_layer(h)
        logits = self.fc(self.mu)
        return {"logits": logits, "mu": self.mu, "logvar": self.logvar} if self.as_dict else logits


def kl_numpy(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    return 0.5 * np.sum(mu.astype(np.float64) ** 2 + np.exp(logvar.astype(np.float64)) - logvar - 1, axis=1)


def test_kl_gaussian_is_the_closed_form():
    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(50, 7, generator=generator) * 2, torch.randn(50, 7, generator=generator)
    scores = oodbench.create_postprocessor("kl_gaussian").score(
        Outputs(logits=torch.zeros(50, 3), extras={"mu": mu, "logvar": logvar}))
    np.testing.assert_allclose(scores.numpy(), -kl_numpy(mu.numpy(), logvar.numpy()), rtol=1e-12)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp()), torch.distributions.Normal(0.0, 1.0))
    np.testing.assert_allclose(scores.numpy(), -reference.sum(1).numpy(), rtol=1e-10)
    assert float(kl_to_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0  # the prior itself


def test_kl_gaussian_is_higher_for_latents_near_the_prior():
    generator = torch.Generator().manual_seed(1)
    near = {"mu": 0.3 * torch.randn(200, 8, generator=generator), "logvar": 0.1 * torch.randn(200, 8, generator=generator)}
    far = {"mu": 3 + torch.randn(200, 8, generator=generator), "logvar": -2 + torch.randn(200, 8, generator=generator)}
    method = oodbench.create_postprocessor("kl_gaussian")
    id_scores = method.score(Outputs(logits=torch.zeros(200, 2), extras=near)).numpy()
    ood_scores = method.score(Outputs(logits=torch.zeros(200, 2), extras=far)).numpy()
    assert roc_auc_score(np.r_[np.ones(200), np.zeros(200)], np.r_[id_scores, ood_scores]) > 0.99


@pytest.mark.parametrize("extras,as_dict", [({"mu": "mu", "logvar": "logvar"}, False),
                                            ({"mu": "mu_layer", "logvar": "logvar_layer"}, False),
                                            ({"mu": "mu", "logvar": "logvar"}, True)])
def test_extras_reach_kl_gaussian(digits, tmp_path, extras, as_dict):
    """Attributes set in forward, layer outputs (hooks) and dict entries: the cached extras
    give the closed-form KL of the model's own mu and logvar, and its AUROC."""
    net = LatentNet(as_dict).eval()
    options = {"extras": extras, "output": "logits" if as_dict else None}
    noise = digits.ood["gaussian"]
    frame = oodbench.evaluate(net, digits.test, {"noise": noise}, ["msp", "kl_gaussian"], cache_dir=str(tmp_path),
                              **options)
    with torch.no_grad():
        net(digits.test[0])
        id_kl = kl_numpy(net.mu.numpy(), net.logvar.numpy())
        net(noise)
        ood_kl = kl_numpy(net.mu.numpy(), net.logvar.numpy())
    expected = roc_auc_score(np.r_[np.ones(len(id_kl)), np.zeros(len(ood_kl))], -np.r_[id_kl, ood_kl])
    row = frame.set_index("postprocessor").loc["kl_gaussian"]
    assert row["noise|auroc"] == pytest.approx(expected, abs=1e-12)
    detector = oodbench.detector("kl_gaussian", net, val=digits.val, cache_dir=str(tmp_path), **options)
    np.testing.assert_allclose(detector.score(noise).numpy(), -ood_kl, rtol=1e-5)


def test_missing_or_stale_extras_are_one_line(digits, tmp_path):
    with pytest.raises(OodbenchError, match=r"'kl_gaussian' needs the model's extras mu, logvar; name them with extras="):
        oodbench.evaluate(LatentNet(), digits.test, {"noise": digits.ood["gaussian"]}, ["kl_gaussian"],
                          cache_dir=str(tmp_path))

    class SetOnce(LatentNet):
        def __init__(self):
            super().__init__()
            self.mu = torch.zeros(1, 5)

        def forward(self, x):
            return self.fc(self.mu_layer(self.body(x)))

    with pytest.raises(OodbenchError, match=r"extra 'mu': model.mu was not set anew in this forward pass"):
        oodbench.evaluate(SetOnce(), digits.test, {"noise": digits.ood["gaussian"]}, ["msp"],
                          cache_dir=str(tmp_path), extras={"mu": "mu"})


def test_yaml_runs_mark_kl_gaussian_missing_without_extras(tmp_path, session_cache):
    frame = oodbench.run(digits_config(tmp_path, postprocessors=["msp", "kl_gaussian"]), cache_dir=str(session_cache),
                         quiet=True)
    row = frame.set_index("postprocessor").loc["kl_gaussian"]
    assert row.status == "missing" and "needs the model's extras mu, logvar" in row.reason
    assert frame.set_index("postprocessor").loc["msp"].status == "done"


# ------------------------------------------------------------------ single-logit (binary) models


class Binary(nn.Module):
    def __init__(self, squeeze: bool = False, probabilities: bool = False):
        super().__init__()
        torch.manual_seed(2)
        self.fc, self.squeeze, self.probabilities = nn.Linear(64, 1), squeeze, probabilities
        with torch.no_grad():
            self.fc.weight.mul_(3)  # logits of a few units: both classes get probability

    def forward(self, x):
        z = self.fc(x.flatten(1))
        z = torch.sigmoid(z) if self.probabilities else z
        return z.squeeze(1) if self.squeeze else z


@pytest.mark.parametrize("squeeze", [False, True])
def test_single_logit_is_two_class_logits(digits, tmp_path, squeeze):
    net, images = Binary(squeeze), digits.test[0]
    with torch.no_grad():
        z = net.fc(images.flatten(1)).squeeze(1).double().numpy()
    p = expit(z)
    expected = {"msp": np.maximum(p, 1 - p), "ebo": np.logaddexp(0, z), "mls": np.maximum(z, 0),
                "entropy": p * np.log(p) + (1 - p) * np.log1p(-p)}
    val = (digits.val[0], digits.val[1] % 2)
    for name, formula in expected.items():
        scores = oodbench.detector(name, net, val=val, cache_dir=str(tmp_path)).score(images).double().numpy()
        np.testing.assert_allclose(scores, formula, rtol=1e-5, atol=1e-6, err_msg=name)
    adapter = ModelAdapter(Binary(squeeze), num_classes=1, identity="binary")
    features, logits = adapter.features(images)
    weight, bias = adapter.fc
    assert adapter.num_classes == 2 and logits.shape == (len(images), 2) and bool((logits[:, 0] == 0).all())
    torch.testing.assert_close(features @ weight.T + bias, logits)
    labels = digits.test[1] % 2
    frame = oodbench.evaluate(net, (images, labels), {"noise": digits.ood["gaussian"]}, ["msp"], cache_dir=str(tmp_path))
    assert frame.acc.item() == pytest.approx(np.mean((z > 0) == labels.numpy()))


def test_single_probability_output_is_two_class_log_probabilities(digits, tmp_path):
    net, images = Binary(probabilities=True), digits.test[0]
    with torch.no_grad():
        p = torch.sigmoid(net.fc(images.flatten(1))).squeeze(1).double().numpy()
    scores = oodbench.detector("msp", net, val=(digits.val[0], digits.val[1] % 2), cache_dir=str(tmp_path),
                               outputs_probabilities=True).score(images).numpy()
    np.testing.assert_allclose(scores, np.maximum(p, 1 - p), rtol=1e-5)


# ------------------------------------------------------------------ the detector


@pytest.mark.parametrize("name", ["msp", "vim", "knn", "odin"])
def test_detector_scores_are_the_harness_scores(digits, yaml_run, tmp_path, name):
    experiment = yaml_run.experiment
    spec = experiment.config.models[0]
    method = experiment.fitted(spec, name)
    detector = oodbench.detector(name, digits.net, fit=digits.train, val=digits.val, params=dict(method.params),
                                 cache_dir=str(tmp_path))
    assert detector.method.params == method.params
    for split, images in (("id:test", digits.test[0]), ("far:gaussian", digits.ood["gaussian"])):
        np.testing.assert_array_equal(detector.score(images).double().numpy(), experiment.scores(method, spec, split))
    val_scores = experiment.scores(method, spec, "id:val")
    assert detector.threshold == threshold_keeping(val_scores, 0.95)
    assert np.mean(val_scores >= detector.threshold) >= 0.95 and np.mean(val_scores > detector.threshold) < 0.95


@pytest.fixture(scope="module")
def every_method_run(digits, tmp_path_factory):
    """`oodbench run` on digits with every registered method at its defaults."""
    path = digits_config(tmp_path_factory.mktemp("every"), postprocessors=["all"], search=False)
    oodbench.run(path, cache_dir=str(digits.cache), quiet=True)
    return CachedExperiment.open(path, cache_dir=str(digits.cache))


BUILTIN = [e.name for e in oodbench.registry.POSTPROCESSORS.entries()
           if e.origin == "builtin" and not e.obj.needs_extras and e.name not in NOT_ON_DIGITS]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_as_a_detector_scores_like_the_run(digits, every_method_run, tmp_path, name):
    """Output-, feature- and input-gradient methods: the detector's batch scores of the ID test
    images are the scores the run computed (same fit, same outputs, same code)."""
    spec = every_method_run.config.models[0]
    method = every_method_run.fitted(spec, name)
    detector = oodbench.detector(name, digits.net, fit=digits.train, val=digits.val, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(detector.score(digits.test[0]).double().numpy(),
                                  every_method_run.scores(method, spec, "id:test"))
    loaded = oodbench.load_detector(detector.save(tmp_path / f"{name}.detector"), digits.net)
    assert loaded.threshold == detector.threshold and loaded.method.params == detector.method.params
    few = digits.test[0][:16]
    assert torch.equal(loaded.score(few), detector.score(few))


def test_detector_with_search_chooses_the_runs_hyperparameters(digits, yaml_run, tmp_path):
    experiment = yaml_run.experiment
    searched = experiment.fitted(experiment.config.models[0], "knn").params
    detector = oodbench.detector("knn", digits.net, fit=digits.train, val=digits.val, ood_val=digits.ood_val,
                                 cache_dir=str(tmp_path))
    assert detector.method.params == searched


def test_detector_says_the_class_or_novel_and_survives_save_and_load(digits, tmp_path):
    detector = oodbench.detector("vim", digits.net, fit=digits.train, val=digits.val, cache_dir=str(tmp_path))
    images, labels = digits.test
    answers = detector.predict(images)
    scores = detector.score(images)
    with torch.no_grad():
        classes = digits.net(images).argmax(1)
    assert torch.equal(answers, torch.where(scores.double() >= detector.threshold, classes, -1))
    assert (answers == labels).float().mean() > 0.85 and (answers == -1).float().mean() < 0.1
    assert (detector.predict(digits.ood["uniform"]) == -1).float().mean() > 0.9
    path = detector.save(tmp_path / "vim.detector")
    payload = torch.load(path, weights_only=True)  # tensors and plain values only
    assert payload["postprocessor"] == "vim" and "net" not in payload and set(payload["fit_state"]) == {
        "origin", "basis", "alpha"}
    loaded = oodbench.load_detector(path, digits.net)
    assert loaded.threshold == detector.threshold and loaded.method.params == detector.method.params
    assert torch.equal(loaded.score(images), scores) and torch.equal(loaded.predict(images), answers)
    other = type(digits.net)()
    with pytest.raises(OodbenchError, match=r"weights \(hash \w+\) are not the ones the detector was fitted on"):
        oodbench.load_detector(path, other)
    assert oodbench.load_detector(path, other, check_weights=False).threshold == detector.threshold


def test_detector_with_a_given_tau(digits, tmp_path):
    detector = oodbench.detector("msp", digits.net, val=digits.val, tau=0.99, cache_dir=str(tmp_path))
    scores = detector.score(digits.test[0])
    assert detector.threshold == 0.99
    assert torch.equal(detector.predict(digits.test[0]) == -1, scores.double() < 0.99)


# ------------------------------------------------------------------ the operating point per head


class TwoHeads(nn.Module):
    """The digits network with a second head: parity of the digit (even / odd)."""

    def __init__(self, net: nn.Module, parity: nn.Linear):
        super().__init__()
        self.body, self.digit, self.parity = net.body, net.fc, parity

    def forward(self, x):
        hidden = self.body(x)
        return {"digit": self.digit(hidden), "parity": self.parity(hidden)}


@pytest.fixture(scope="module")
def two_heads(digits):
    """A parity head fitted by logistic regression on the frozen digits features."""
    with torch.no_grad():
        hidden = digits.net.body(digits.train[0])
    torch.manual_seed(0)
    parity = nn.Linear(hidden.shape[1], 2)
    optimizer = torch.optim.Adam(parity.parameters(), lr=0.01)
    for _ in range(200):
        loss = nn.functional.cross_entropy(parity(hidden), digits.train[1] % 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return TwoHeads(digits.net, parity).eval()


def test_operating_point_per_head_with_held_out_classes(digits, two_heads, tmp_path):
    def labelled(split):
        images, labels = split
        return images, {"digit": labels, "parity": labels % 2}

    held = {"digit": [5], "parity": []}
    frame = oodbench.operating_point(two_heads, labelled(digits.test), {"noise": digits.ood["gaussian"],
                                     "textures": digits.ood["textures"]}, "msp", val=labelled(digits.val),
                                     heads=["digit", "parity"], holdout_classes=held, cache_dir=str(tmp_path))
    assert list(frame.model) == ["TwoHeads[digit]", "TwoHeads[parity]"]
    with torch.no_grad():
        outputs = {name: {head: torch.softmax(logits, 1) for head, logits in two_heads(images).items()}
                   for name, images in (("val", digits.val[0]), ("test", digits.test[0]),
                                        ("noise", digits.ood["gaussian"]), ("textures", digits.ood["textures"]))}
    for row in frame.itertuples():
        head = row.model.split("[")[1][:-1]
        holdout = held[head]
        val_labels, test_labels = digits.val[1], digits.test[1]
        seen_val = ~np.isin(val_labels.numpy(), holdout)
        tau = threshold_keeping(outputs["val"][head].max(1).values.double().numpy()[seen_val], 0.95)
        assert row.tau == pytest.approx(tau, abs=1e-6)
        score, prediction = (t.numpy() for t in outputs["test"][head].max(1))
        labels = (test_labels if head == "digit" else test_labels % 2).numpy()
        accepted = score >= row.tau
        assert row.id_accepted == pytest.approx(accepted.mean())
        assert row.accuracy_accepted == pytest.approx((prediction == labels)[accepted].mean())
        ood_scores = np.r_[outputs["noise"][head].max(1).values.numpy(), outputs["textures"][head].max(1).values.numpy()]
        assert row.ood_rejected == pytest.approx(np.mean(ood_scores < row.tau))
        unseen = np.isin(labels, holdout)
        if holdout:
            assert row.seen_accuracy == pytest.approx(np.mean((accepted & (prediction == labels))[~unseen]))
            assert row.unseen_accuracy == pytest.approx(np.mean(~accepted[unseen]))
        else:
            assert np.isnan(row.seen_accuracy) or row.seen_accuracy == pytest.approx(
                np.mean(accepted & (prediction == labels)))


def test_evaluate_one_head_with_labels_per_head(digits, two_heads, tmp_path):
    images, labels = digits.test
    per_head = (images, {"digit": labels, "parity": labels % 2})
    frame = oodbench.evaluate(two_heads, per_head, {"noise": digits.ood["gaussian"]}, ["msp"], output="parity",
                              cache_dir=str(tmp_path))
    with torch.no_grad():
        parity = two_heads(images)["parity"].argmax(1)
    assert frame.acc.item() == pytest.approx((parity == labels % 2).float().mean().item())
    with pytest.raises(OodbenchError, match=r"labels are given per head \(digit, parity\): evaluate one head"):
        oodbench.evaluate(two_heads, per_head, {"noise": digits.ood["gaussian"]}, ["msp"],
                          output=lambda out: out["digit"], cache_dir=str(tmp_path))


def test_report_operating_point_for_two_heads_with_holdout(digits, two_heads, tmp_path, run_cli):
    """`oodbench report --operating-point` on a torch: model with two 6-class heads (one entry
    per head, each with its output option) and holdout_classes on the benchmark's test split."""
    model_file = tmp_path / "heads.py"
    model_file.write_text(HEADS_MODULE)
    spec = importlib.util.spec_from_file_location("heads_module", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.Heads()
    net.body.load_state_dict(digits.net.body.state_dict())
    net.main.load_state_dict(digits.net.fc.state_dict())
    with torch.no_grad():
        net.aux.weight.copy_(digits.net.fc.weight * 0.5)
        net.aux.bias.copy_(digits.net.fc.bias)
    torch.save(net.state_dict(), tmp_path / "heads.pt")
    raw = yaml.safe_load((REPO / "configs" / "benchmarks" / "digits.yaml").read_text())
    raw["name"] = "digits-holdout"
    raw["id"]["test"]["holdout_classes"] = [4, 5]
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(raw))
    models = [{"name": f"torch:{tmp_path / 'heads.pt'}", "label": f"heads[{head}]",
               "options": {"module": f"{model_file}:Heads", "output": head, "classifier": head}}
              for head in ("main", "aux")]
    config = digits_config(tmp_path, benchmark=str(tmp_path / "bench.yaml"), models=models,
                           postprocessors=["msp", "temp_scaling"])
    assert run_cli("run", config).returncode == 0
    result = run_cli("report", config, "--operating-point", "--postprocessor", "msp")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| heads[main]" in out and "| heads[aux]" in out and "seen acc." in out and "unseen acc." in out
    assert "held-out classes [4, 5] as pseudo-novel" in out
    bad = dict(raw, name="bad")
    bad["id"]["val"]["holdout_classes"] = [1]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = run_cli("validate", digits_config(tmp_path, benchmark=str(tmp_path / "bad.yaml")))
    assert result.returncode == 2 and "holdout_classes belongs to the ID test split" in result.stderr


HEADS_MODULE = '''
import torch
from torch import nn

from oodbench.models.digits import DigitsCNN


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DigitsCNN().body
        self.main, self.aux = nn.Linear(128, 6), nn.Linear(128, 6)

    def forward(self, x):
        hidden = self.body(x)
        return {"main": self.main(hidden), "aux": self.aux(hidden)}
'''


# ------------------------------------------------------------------ the example, bad input


def test_the_notebook_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("notebook_style", REPO / "examples" / "notebook_style.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(tiny=True, cache_dir=str(tmp_path))
    board = result["leaderboard"]
    assert list(board.postprocessor) == ["msp", "ebo", "vim", "kl_gaussian"] and (board.status == "done").all()
    assert set(result["calibration"].model) == {"latent", "softmax"}
    assert {"seen_accuracy", "unseen_accuracy"} <= set(result["operating_point"].columns)
    assert result["loaded"].threshold == result["detector"].threshold
    assert all(answer == -1 for answer in result["answers"]["noise"])


@pytest.mark.parametrize("call,message", [
    (lambda d, c: oodbench.evaluate(d.net, d.test[0], {"n": d.ood["gaussian"]}, cache_dir=c),
     "id_test: labels are needed"),
    (lambda d, c: oodbench.evaluate(d.net, (d.test[0][:, :, :, :6], d.test[1]), {"n": d.ood["gaussian"]}, cache_dir=c),
     "images are 8x6"),
    (lambda d, c: oodbench.evaluate(d.net, (d.test[0], d.test[1] + 3), {"n": d.ood["gaussian"]}, cache_dir=c),
     r"id_test: labels \[6, 7, 8\] are not classes of the model"),
    (lambda d, c: oodbench.evaluate(d.net, d.test, {}, cache_dir=c), "ood is empty"),
    (lambda d, c: oodbench.evaluate(d.net, d.test, {"n": d.ood["gaussian"]}, groups={"near": ["m"]}, cache_dir=c),
     "groups.near: 'm' is not one of the OOD sets"),
    (lambda d, c: oodbench.evaluate("net", d.test, {"n": d.ood["gaussian"]}, cache_dir=c), "must be a torch nn.Module"),
    (lambda d, c: oodbench.evaluate(d.net, d.test, {"n": d.ood["gaussian"]}, ["vim"], cache_dir=c),
     "'vim' is fitted on ID data and needs val= .ID validation images. even when fit= is given"),
    (lambda d, c: oodbench.evaluate(d.net, d.test, {"n": d.ood["gaussian"]}, ["nope"], cache_dir=c),
     "unknown postprocessor 'nope'"),
    (lambda d, c: oodbench.evaluate(d.net, d.test, {"n": d.ood["gaussian"]}, fpr="x", cache_dir=c), "fpr must be one of"),
    (lambda d, c: oodbench.detector("msp", d.net, val=d.val, keep=1.5, cache_dir=c), r"keep must be a share in \(0, 1\]"),
    (lambda d, c: oodbench.detector("knn", d.net, tau=1.0, cache_dir=c), "'knn': pass val="),
    (lambda d, c: oodbench.load_detector(Path(c) / "missing.detector", d.net), "detector file not found"),
])
def test_bad_input_is_one_line(digits, tmp_path, call, message):
    with pytest.raises(OodbenchError, match=message) as error:
        call(digits, str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_a_detector(digits, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(OodbenchError, match="is not a saved oodbench detector"):
        oodbench.load_detector(path, digits.net)
    shutil.copy(REPO / "README.md", tmp_path / "readme.detector")
    with pytest.raises(OodbenchError, match="is not a saved oodbench detector"):
        oodbench.load_detector(tmp_path / "readme.detector", digits.net)


# ------------------------------------------------------------------ data forms: accepted, or one line naming the form

class _DictItems(torch.utils.data.Dataset):
    """Items as dicts, as Hugging Face-style datasets yield them."""

    def __init__(self, images, labels=None, image_key="image", label_key="label"):
        self.images, self.labels, self.keys = images, labels, (image_key, label_key)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        item = {self.keys[0]: self.images[index]}
        if self.labels is not None:
            item[self.keys[1]] = self.labels[index]
        return item


@pytest.fixture(scope="module")
def tiny():
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    images, labels = torch.rand(40, 3, 8, 8, generator=generator), torch.arange(40) % 4
    far, near = torch.rand(30, 3, 8, 8, generator=generator) * 0.5, torch.rand(20, 3, 8, 8, generator=generator)
    return SimpleNamespace(net=net, test=(images, labels), far=far, near=near)


def tiny_numbers(tiny, id_test, ood, cache):
    frame = oodbench.evaluate(tiny.net, id_test, ood, ["msp"], search=False, cache_dir=str(cache))
    return frame[metric_columns(frame)].to_numpy(float)


@pytest.mark.parametrize("form", ["tensor-dataset loaders", "dict items", "dict batches", "list of sets"])
def test_common_data_forms_give_the_numbers_of_tensors(tiny, tmp_path, form):
    images, labels = tiny.test
    expected = tiny_numbers(tiny, tiny.test, {"ood0": tiny.far, "ood1": tiny.near}, tmp_path)
    id_test, ood = {
        "tensor-dataset loaders": (DataLoader(TensorDataset(images, labels), batch_size=16),
                                   {"ood0": DataLoader(TensorDataset(tiny.far), batch_size=7),
                                    "ood1": DataLoader(TensorDataset(tiny.near))}),
        "dict items": (_DictItems(images, labels, "input", "target"),
                       {"ood0": _DictItems(tiny.far), "ood1": _DictItems(tiny.near, image_key="images")}),
        "dict batches": (DataLoader(_DictItems(images, labels), batch_size=9),
                         {"ood0": {"image": tiny.far}, "ood1": DataLoader(_DictItems(tiny.near), batch_size=5)}),
        "list of sets": ({"image": images, "label": labels}, [tiny.far, (tiny.near,)]),
    }[form]
    assert np.array_equal(tiny_numbers(tiny, id_test, ood, tmp_path), expected, equal_nan=True)


def test_a_pair_of_images_and_labels_is_one_ood_set_and_a_list_of_two_sets_is_two(tiny, tmp_path):
    pair = oodbench.evaluate(tiny.net, tiny.test, [tiny.far, torch.arange(30) % 4], search=False,
                             cache_dir=str(tmp_path))
    two = oodbench.evaluate(tiny.net, tiny.test, [tiny.far, tiny.near], search=False, cache_dir=str(tmp_path))
    assert [c for c in pair.columns if c.startswith("ood")] == ["ood|fpr", "ood|auroc"]
    assert [c for c in two.columns if c.startswith("ood")] == ["ood0|fpr", "ood0|auroc", "ood1|fpr", "ood1|auroc"]


class _Strings(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return f"img{index}.png", index


class _Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3, 8 + index % 2, 8 + index % 2), 0


def _generator(tiny):
    yield tiny.test


BAD_DATA = [  # (id_test, ood, what the one line must say); t: the tiny fixture
    (lambda t: t.test[0], lambda t: t.far, "id_test: labels are needed"),
    (lambda t: DataLoader(TensorDataset(t.test[0])), lambda t: t.far, "id_test: labels are needed"),
    (lambda t: DataLoader(_DictItems(t.test[0])), lambda t: t.far, "id_test: labels are needed"),
    (lambda t: _DictItems(t.test[0], t.test[1], "pic", "cls"), lambda t: t.far,
     "id_test: a dict needs its images under one of the keys image, images"),
    (lambda t: {"pic": t.test[0], "label": t.test[1]}, lambda t: t.far, "got keys pic, label"),
    (lambda t: None, lambda t: t.far, "id_test: expected a DataLoader or Dataset .* got NoneType None"),
    (lambda t: "data/cifar10/test", lambda t: t.far, "id_test: expected a DataLoader .* got str 'data/cifar10/test'"),
    (lambda t: _generator(t), lambda t: t.far, "id_test: expected .* got a generator"),
    (lambda t: _Strings(), lambda t: t.far, "id_test: dataset items must be .* got str 'img0.png'"),
    (lambda t: DataLoader(_Ragged(), batch_size=2), lambda t: t.far,
     "id_test: the DataLoader cannot make a batch .*images of one shape"),
    (lambda t: _Ragged(), lambda t: t.far, r"id_test: items have images of different shapes \(3x8x8, 3x9x9\)"),
    (lambda t: (t.test[0], t.test[1].float()), lambda t: t.far, "id_test: labels must be one integer class index"),
    (lambda t: (t.test[0], t.test[1][:-1]), lambda t: t.far, r"id_test: 40 images but labels of shape \[39\]"),
    (lambda t: (t.test[0], ["cat"] * 40), lambda t: t.far, "id_test: labels must be a tensor or array of numbers"),
    (lambda t: ([["a"]] * 40, t.test[1]), lambda t: t.far, "id_test: images must be a tensor or array of numbers"),
    (lambda t: (t.test[0][None], t.test[1]), lambda t: t.far, r"id_test: images must be N x C x H x W .* \[1, 40"),
    (lambda t: (t.test[0].int(), t.test[1]), lambda t: t.far, "id_test: images must be float in .0,1. or uint8"),
    (lambda t: (t.test[0][:0], t.test[1][:0]), lambda t: t.far, "id_test has no images"),
    (lambda t: t.test, lambda t: [], "ood is empty"),
    (lambda t: t.test, lambda t: {"noise": None}, r"ood\['noise'\]: expected a DataLoader"),
    (lambda t: t.test, lambda t: [t.far, "noise.png"], r"ood\['ood1'\]: expected .* got str 'noise.png'"),
    (lambda t: t.test, lambda t: DataLoader(list(range(10))), r"ood\['ood'\]: images must be N x C x H x W"),
    (lambda t: t.test, lambda t: (t.far, t.near, t.far), r"ood\['ood0'\]"),  # fine: 3 sets, named
]


@pytest.mark.parametrize("index", range(len(BAD_DATA)))
def test_bad_data_is_one_line_naming_the_form(tiny, tmp_path, index):
    id_test, ood, message = BAD_DATA[index]
    if index == len(BAD_DATA) - 1:  # a tuple of three data sets is three sets, not a bad (images, labels)
        frame = oodbench.evaluate(tiny.net, id_test(tiny), ood(tiny), search=False, cache_dir=str(tmp_path))
        assert [c for c in frame.columns if c.startswith("ood") and c.endswith("|auroc")] == \
            ["ood0|auroc", "ood1|auroc", "ood2|auroc"]
        return
    with pytest.raises(OodbenchError, match=message) as error:
        oodbench.evaluate(tiny.net, id_test(tiny), ood(tiny), search=False, cache_dir=str(tmp_path))
    assert "\n" not in str(error.value)
