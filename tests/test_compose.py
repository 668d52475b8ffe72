"""Shaping x scorer composites (`oodbench.postprocessors.compose`): each against the scorer's
formula written again in NumPy on features shaped in NumPy; with the energy score, equal to
the registered shaping methods; ``gen_react`` / ``pro_gen_react`` are ``react+gen`` /
``react+pro_gen``; the search covers both parts' lists; the grid equals one-by-one scoring;
bad names fail in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import pytest
from scipy.special import logsumexp, softmax

from oodbench.benchmark.plan import search_space_for
from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS
from tests.test_feature_postprocessors import DIM, N_TEST, data, ref_knn, run  # noqa: F401  (the data fixture)


def shaped_np(d, shaper: str, p: float):
    """(train z', test z', W') of the NumPy data under one shaper."""
    k = DIM - int(np.round(DIM * p / 100))

    def one(z):
        if shaper == "react":
            return np.minimum(z, np.percentile(d["train"], p))
        if shaper == "scale":
            top = -np.sort(-z, axis=1)[:, :k].sum(axis=1)
            return z * np.exp(z.sum(axis=1) / top)[:, None]
        if shaper.startswith("ash"):
            out = np.zeros_like(z)
            for i, row in enumerate(z):
                top = np.argsort(-row)[:k]
                out[i, top] = {"ash_b": row.sum() / k, "ash_p": row[top],
                               "ash_s": row[top] * np.exp(row.sum() / row[top].sum())}[shaper]
            return out
        return z

    weight = d["W"]
    if shaper == "dice":
        contribution = d["W"] * d["train"].mean(axis=0)[None]
        weight = d["W"] * (contribution > np.percentile(contribution, p))
    return one(d["train"]), one(d["test"]), weight


def gen_np(logits, gamma=0.1, m=100):
    top = -np.sort(-softmax(logits, axis=1), axis=1)[:, :m]
    return -(top**gamma * (1 - top) ** gamma).sum(axis=1)


SHAPERS = [("react", 85), ("ash_b", 70), ("ash_p", 65), ("ash_s", 80), ("scale", 75), ("dice", 50)]
SCORERS = {
    "ebo": lambda d, train, test, w: logsumexp(test @ w.T + d["b"], axis=1),
    "msp": lambda d, train, test, w: softmax(test @ w.T + d["b"], axis=1).max(axis=1),
    "gen": lambda d, train, test, w: gen_np(test @ w.T + d["b"]),
    "knn": lambda d, train, test, w: ref_knn({"train": train, "test": test}, 5),
}


@pytest.mark.parametrize("shaper,p", SHAPERS, ids=[s for s, _ in SHAPERS])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_composite_is_the_scorer_on_shaped_outputs(shaper, p, scorer, data):
    train, test, weight = shaped_np(data, shaper, p)
    expected = SCORERS[scorer](data, train, test, weight)
    params = {"percentile": p, **({"k": 5} if scorer == "knn" else {})}
    got = run(f"{shaper}+{scorer}", data, **params)
    # KNN normalises in float32, and sqrt(2 - 2 cos) near cos = 1 magnifies that to ~3e-4
    tolerance = {"rtol": 1e-5, "atol": 1e-3} if scorer == "knn" else {"rtol": 1e-6, "atol": 0}
    np.testing.assert_allclose(got, expected, **tolerance)
    assert np.std(expected) > 0


@pytest.mark.parametrize("shaper,method,params", [
    ("react", "react", {}), ("ash_b", "ash", {}), ("ash_p", "ash", {"variant": "p"}),
    ("ash_s", "ash", {"variant": "s"}), ("scale", "scale", {}), ("dice", "dice", {})])
def test_with_the_energy_score_it_is_the_registered_shaping_method(shaper, method, params, data):
    percentile = POSTPROCESSORS.get(method).defaults["percentile"]
    composite = run(f"{shaper}+ebo", data, percentile=percentile)
    np.testing.assert_allclose(composite, run(method, data, **params), rtol=1e-6)  # float32 vs float64 energy


def test_gen_react_and_pro_gen_react_are_composites():
    assert POSTPROCESSORS.get("gen_react") is POSTPROCESSORS.get("react+gen")
    assert POSTPROCESSORS.get("pro_gen_react") is POSTPROCESSORS.get("react+pro_gen")
    assert POSTPROCESSORS.get("gen_react").defaults == {"percentile": 90, "gamma": 0.1, "top_m": 100}


def test_search_covers_both_parts():
    space = search_space_for("ash_s+gen", POSTPROCESSORS.get("ash_s+gen"))
    assert space == {**search_space_for("ash", POSTPROCESSORS.get("ash")),
                     **search_space_for("gen", POSTPROCESSORS.get("gen"))}
    assert set(search_space_for("react+knn", POSTPROCESSORS.get("react+knn"))) == {"percentile", "k"}
    # gen_react keeps its own lists (the PRO code's), read from configs/postprocessors/gen_react.yaml
    assert search_space_for("react+gen", POSTPROCESSORS.get("react+gen"))["top_m"] == [500]


def test_grid_shapes_once(data):
    method = POSTPROCESSORS.get("ash_s+gen")(percentile=70)
    method.fit(data["train_out"], data["train_out"])
    combos = [{"gamma": g, "top_m": m} for g in (0.1, 2) for m in (2, 5)]
    for combo, scores in zip(combos, method.score_grid(data["test_out"], combos)):
        _, test, weight = shaped_np(data, "ash_s", 70)
        np.testing.assert_allclose(scores.numpy(), gen_np(test @ weight.T + data["b"], combo["gamma"], combo["top_m"]),
                                   rtol=1e-6)


@pytest.mark.parametrize("name,message", [
    ("foo+ebo", "unknown shaper 'foo'"), ("react+odin", "only the PRO family composes"),
    ("react+ash", "shapes activations itself"), ("react+kl_gaussian", "reads more than"),
    ("react+nope", "unknown postprocessor 'nope'")])
def test_bad_composites_fail_in_one_line(name, message):
    with pytest.raises(OodbenchError, match=message) as error:
        POSTPROCESSORS.get(name)
    assert "\n" not in str(error.value)


def test_hyperparameters_are_checked_on_both_parts():
    with pytest.raises(OodbenchError, match="percentile=100"):
        POSTPROCESSORS.get("ash_s+ebo")(percentile=100)
    with pytest.raises(OodbenchError, match="no hyperparameter 'alpha'"):
        POSTPROCESSORS.get("react+ebo")(alpha=1)
    assert POSTPROCESSORS.get("react+ebo")(temperature=2.0).params == {"percentile": 90, "temperature": 2.0}


# ----------------------------------------------------------------- BATS: the model's last BatchNorm


def bn_adapter():
    """A network whose penultimate features are the pooled output of a BatchNorm over 8 channels
    (weight and bias set, one weight negative) after a ReLU block, as in the reference's ResNets."""
    from oodbench.models.adapter import ModelAdapter

    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.2, 0.8, 8))
        norm.bias.copy_(torch.linspace(-0.3, 0.4, 8))
        norm.running_mean.uniform_(-0.5, 0.5)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 8, 3), norm, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5))
    return ModelAdapter(net.eval(), num_classes=5, identity="test:bn")


def bn_outputs(adapter, seed, scale=1.0):
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        z, logits = adapter.features(x)
    return Outputs(logits=logits, features=z, fc=adapter.fc, model=adapter)


@pytest.mark.parametrize("name,lam", [("bats", 3.25), ("bats+ebo", 0.5), ("bats+msp", 1.05)])
def test_bats_clamps_to_the_last_batchnorm_typical_set(name, lam):
    adapter = bn_adapter()
    train, test = bn_outputs(adapter, 1), bn_outputs(adapter, 2, scale=4.0)
    norm = adapter.net[4]
    gamma, beta = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    z = test.features.double().numpy()
    clamped = np.maximum(np.minimum(z, beta + lam * gamma), beta - lam * gamma)  # the reference's two where()s
    assert (clamped != z).any()
    logits = clamped @ adapter.fc[0].double().numpy().T + adapter.fc[1].double().numpy()
    expected = softmax(logits, axis=1).max(axis=1) if name.endswith("msp") else logsumexp(logits, axis=1)
    method = POSTPROCESSORS.get(name)(lam=lam)
    assert method.needs_weights
    method.fit(train, train)
    np.testing.assert_allclose(method.score(test).numpy(), expected, rtol=1e-9)
    halves = [replace(test, logits=test.logits[rows], features=test.features[rows]) for rows in (slice(0, 15),
                                                                                               slice(15, None))]
    np.testing.assert_array_equal(torch.cat([method.score(h) for h in halves]).numpy(), method.score(test).numpy())


def test_bats_without_a_batchnorm_of_the_feature_width_fails_in_one_line():
    adapter = bn_adapter()
    train = bn_outputs(adapter, 1)
    with pytest.raises(OodbenchError, match="last BatchNorm over the 8 penultimate channels; the outputs carry no"):
        POSTPROCESSORS.get("bats")().fit(replace(train, model=None), train)
    adapter.net[4] = torch.nn.Identity()
    with pytest.raises(OodbenchError, match="this model has none"):
        POSTPROCESSORS.get("bats")().fit(train, train)


# ----------------------------------------------------------------- odin+<scorer>: ODIN's perturbation first


def perturbed_np(model, x, temperature, eps):
    """ODIN's x' = x - eps sign(grad CE(f(x)/T, argmax f(x))), sign(0) = +1, written out in torch."""
    v = x.clone().requires_grad_(True)
    logits = model(v)
    loss = torch.nn.functional.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, v)
    return (x - eps * torch.where(grad >= 0, 1.0, -1.0)).detach()


@pytest.mark.parametrize("scorer,temperature,eps", [("ebo", 1000.0, 0.0014), ("knn", 10.0, 0.05), ("msp", 1.0, 0.1)])
def test_odin_perturbation_then_any_output_score(scorer, temperature, eps):
    from tests.test_gradient_postprocessors import images, outputs_for, tiny_adapter

    model = tiny_adapter()
    train, x = images(count=30, seed=2), images(count=9, seed=3)
    moved = perturbed_np(model, x, temperature, eps)
    with torch.no_grad():
        z_train, f_train = model.features(train)
        z, f = model.features(moved)
    fit = Outputs(logits=f_train, features=z_train, fc=model.fc)
    params = {"k": 3} if scorer == "knn" else {}
    plain = POSTPROCESSORS.get(scorer)(**params)
    plain.fit(fit, fit)
    expected = plain.score(Outputs(logits=f, features=z, fc=model.fc)).numpy()
    method = POSTPROCESSORS.get(f"odin+{scorer}")(perturb_temperature=temperature, perturb_eps=eps, **params)
    method.fit(fit, fit)
    got = method.score(outputs_for(model, x, batch_size=4)).numpy()  # three batches
    # float32 features of batches of 4 round differently from one batch of 9 (KNN's sqrt magnifies it)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5 if scorer == "knn" else 1e-7)
    clean = plain.score(Outputs(logits=model(x).detach(), features=model.features(x)[0].detach(), fc=model.fc))
    assert not np.allclose(clean.numpy(), expected)  # the perturbation changed the scores


def test_odin_composites_refuse_what_cannot_follow_a_perturbation():
    with pytest.raises(OodbenchError, match="pro_msp does not take perturbed inputs: it runs the model itself"):
        POSTPROCESSORS.get("odin+pro_msp")
    with pytest.raises(OodbenchError, match="'odin\\+ebo' .*|did you mean: odin"):
        POSTPROCESSORS.get("oddin+ebo")
    space = search_space_for("odin+gen", POSTPROCESSORS.get("odin+gen"))
    assert space["perturb_eps"] == [0.0014, 0.0028] and space["gamma"] == search_space_for(
        "gen", POSTPROCESSORS.get("gen"))["gamma"]


def test_list_names_the_composite_syntax_and_what_bats_needs(capsys):
    from oodbench.cli import main

    assert main(["list", "postprocessors", "--wide"]) == 0  # one line per method
    out = capsys.readouterr().out
    assert "composites: <shaper>+<scorer>" in out and "bats, optfs" in out and "odin+<scorer>" in out
    assert "model weights" in next(line for line in out.splitlines() if line.startswith("bats "))
