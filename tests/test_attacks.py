"""Attacks on detectors (oodbench.tasks.attacks): the threat model, PGD against oracles, the
differentiable forms against the methods' own scores, and on the built-in digits models:
attacks lower AUROC, monotonically in eps and steps, eps = 0 gives the clean numbers, the
attacked images stay in the ball, batched equals one by one, results come from the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodbench.tasks.attacks.objectives import EXACT, INNER, SURROGATE, TOPK, detector_objective, method_scores
from oodbench.tasks.attacks.pgd import apgd, fgsm, pgd, project
from oodbench.tasks.attacks.spec import eps_label, parse_attack
from oodbench.errors import OodbenchError
from tests.conftest import digits_config

EPS = [0, 2 / 255, 4 / 255, 8 / 255]


def test_spec_reads_fractions_and_refuses_bad_values():
    spec = parse_attack({"eps": ["8/255", 0.01, 0], "norm": "l2", "steps": 7, "target": "in"})
    assert spec.eps == (8 / 255, 0.01, 0.0) and spec.norm == "l2" and spec.steps == 7 and spec.target == "in"
    assert eps_label(8 / 255) == "8/255" and eps_label(0.01) == "0.01"
    for bad, words in [({"epss": [1]}, "did you mean: eps"), ({"eps": ["8/0"]}, "fraction"),
                       ({"eps": [-1]}, "non-negative"), ({"norm": "l1"}, "not one of"),
                       ({"kind": "fgsm", "norm": "l2"}, "L-inf"), ({"steps": 0}, ">= 1"), ("pgd", "mapping")]:
        with pytest.raises(OodbenchError, match=words):
            parse_attack(bad)


def linear_objective(weight: torch.Tensor):
    return lambda x: (x.flatten(1) * weight.flatten()).sum(dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_the_optimum_of_a_linear_objective(norm):
    """max w.x over the ball and [0,1]: L-inf x + eps sign(w) clamped (solved per pixel);
    L2 away from the box: x + eps w / ||w||."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 4, 4, generator=generator) * 0.6 + 0.2
    weight = torch.randn(1, 4, 4, generator=generator)
    eps = 0.1
    found = pgd(linear_objective(weight), x, eps, norm=norm, steps=30, step_fraction=0.2, schedule="halving")
    optimum = (x + eps * weight.sign()).clamp(0, 1) if norm == "linf" else x + eps * weight / weight.norm()
    gain = linear_objective(weight)(found) - linear_objective(weight)(x)
    best = linear_objective(weight)(optimum) - linear_objective(weight)(x)
    assert torch.all(gain <= best + 1e-5) and torch.all(gain >= 0.999 * best)
    assert torch.allclose(found, optimum, atol=3e-3)
    delta = (found - x).flatten(1)
    assert float(delta.abs().max() if norm == "linf" else delta.norm(dim=1).max()) <= eps + 1e-6
    assert torch.equal(pgd(linear_objective(weight), x, 0.0), x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_through_autoattack_reaches_the_same_optimum(norm):
    """AutoAttack's APGD-CE on the two-class logits [0, objective] maximises the objective:
    the gain of a linear objective is eps ||w||_1 (L-inf) or eps ||w||_2 (L2), inside the box."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 4, 4, generator=generator) * 0.6 + 0.2
    weight = torch.randn(1, 4, 4, generator=generator)
    found = apgd(linear_objective(weight), x, 0.1, norm=norm, steps=20)
    gain = linear_objective(weight)(found) - linear_objective(weight)(x)
    best = 0.1 * (weight.abs().sum() if norm == "linf" else weight.norm())
    assert torch.allclose(gain, best.expand(4), rtol=1e-3)
    assert float((found - x).flatten(1).abs().max() if norm == "linf" else (found - x).flatten(1).norm(dim=1).max()) \
        <= 0.1 + 1e-6


def test_projection_and_fgsm_formulas():
    delta = torch.tensor([[[[3.0, -4.0]]]])
    assert torch.allclose(project(delta, 1.0, "l2"), delta / 5)
    assert torch.equal(project(delta, 1.0, "linf"), torch.tensor([[[[1.0, -1.0]]]]))
    x, weight = torch.full((2, 1, 1, 2), 0.5), torch.tensor([[[1.0, -2.0]]])
    assert torch.allclose(fgsm(linear_objective(weight), x, 0.25), torch.tensor([0.75, 0.25]).expand(2, 1, 1, 2))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, session_cache):
    """A finished digits run of both built-in models (msp, ebo, knn, odin, pro_msp, cfood), read back."""
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.benchmark.runner import run_experiment

    folder = tmp_path_factory.mktemp("attacks")
    path = digits_config(folder, models=[{"name": "digits-cnn", "tags": ["standard"]},
                                         {"name": "digits-cnn-robust", "tags": ["robust"]}],
                         postprocessors=["msp", "ebo", "knn", "odin", "pro_msp", "cfood"], cache_dir=str(session_cache))
    leaderboard = run_experiment(path, quiet=True)
    return CachedExperiment.open(path), leaderboard


def images(experiment, spec, split, count=None):
    inputs = experiment.outputs(spec, split, with_model=True).inputs
    return torch.stack([inputs[i][0] for i in range(count or len(inputs))])


@pytest.mark.parametrize("name, gradient", [("msp", EXACT), ("ebo", EXACT), ("knn", TOPK), ("odin", INNER),
                                            ("pro_msp", INNER), ("cfood", SURROGATE)])
def test_differentiable_forms_equal_the_methods_scores(digits_run, name, gradient):
    experiment, _ = digits_run
    spec = experiment.config.models[0]
    model, x = experiment.model(spec), images(experiment, spec, "id:test", 24)
    method = experiment.fitted(spec, name)
    objective = detector_objective(method, model, x)
    assert objective.gradient == gradient
    if gradient != SURROGATE:
        x = x.requires_grad_(True)
        value = objective.score(x)
        np.testing.assert_allclose(value.detach().numpy(), method_scores(method, model, x.detach()).numpy(),
                                   rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(value.sum(), x)
        assert float(grad.abs().sum()) > 0


def test_attacked_images_stay_in_the_ball_and_batches_equal_one_by_one(digits_run):
    experiment, _ = digits_run
    spec = experiment.config.models[0]
    model, x = experiment.model(spec), images(experiment, spec, "far:textures", 6)
    objective = detector_objective(experiment.fitted(spec, "msp"), model, x)
    for norm, eps in [("linf", 8 / 255), ("l2", 0.5)]:
        batched = pgd(objective.score, x, eps, norm=norm, steps=5, seed=3)
        alone = torch.cat([pgd(objective.score, x[i: i + 1], eps, norm=norm, steps=5, seed=3,
                               indices=torch.tensor([i])) for i in range(len(x))])
        assert torch.allclose(batched, alone, atol=1e-6)
        delta = (batched - x).flatten(1)
        assert float(delta.abs().max() if norm == "linf" else delta.norm(dim=1).max()) <= eps + 1e-6
        assert float(batched.min()) >= 0 and float(batched.max()) <= 1
        assert float(objective.score(batched).mean()) > float(objective.score(x).mean())


def average_auroc(frame, model, method, attack=None, eps=None):
    rows = frame[(frame.model == model) & (frame.postprocessor == method) & (frame.dataset == "average")
                 & (frame.metric == "auroc")]
    rows = rows[rows.attack == "none"] if attack is None else rows[(rows.attack == attack) & (rows.eps == eps)]
    return float(rows.value.iloc[0])


def test_attacks_lower_auroc_monotonically_and_eps_zero_is_clean(digits_run):
    from oodbench.tasks.attacks.evaluate import AttackCache, attack_experiment

    experiment, leaderboard = digits_run
    spec = parse_attack({"eps": EPS, "steps": 5})
    frame = attack_experiment(experiment, spec, ["msp", "ebo"], quiet=True)
    attack = "pgd-linf/both"
    for model in ("digits-cnn", "digits-cnn-robust"):
        for method in ("msp", "ebo"):
            clean = average_auroc(frame, model, method)
            curve = [average_auroc(frame, model, method, attack, eps) for eps in EPS]
            assert curve[0] == clean  # eps = 0 reproduces the clean number exactly
            assert all(later <= earlier for earlier, later in zip(curve, curve[1:])), curve
    for method in ("msp", "ebo"):  # the standard model loses a clear margin at 8/255
        assert average_auroc(frame, "digits-cnn", method, attack, 8 / 255) < \
            average_auroc(frame, "digits-cnn", method) - 0.02
    zero = frame[(frame.attack == attack) & (frame.eps == 0)].reset_index(drop=True)
    clean = frame[frame.attack == "none"].reset_index(drop=True)
    assert zero.value.tolist() == clean.value.tolist()  # every metric of every set
    stored = leaderboard.set_index(["model", "postprocessor"])
    for model in ("digits-cnn", "digits-cnn-robust"):
        near = frame[(frame.model == model) & (frame.postprocessor == "msp") & (frame.attack == "none")
                     & (frame.dataset == "near-OOD") & (frame.metric == "auroc")].value.iloc[0]
        assert near == pytest.approx(stored.loc[(model, "msp")]["near-OOD|auroc"], abs=1e-12)
    cache = AttackCache(experiment.config.cache_dir)
    assert len(list(cache.root.rglob("*.pt"))) > 0
    again = attack_experiment(experiment, spec, ["msp", "ebo"], quiet=True)  # read back from the cache
    assert again.value.tolist() == frame.value.tolist()


def test_more_steps_attack_no_less(digits_run):
    from oodbench.tasks.attacks.evaluate import attack_experiment

    experiment, _ = digits_run
    curve = []
    for steps in (1, 3, 10):
        spec = parse_attack({"eps": ["8/255"], "steps": steps})
        frame = attack_experiment(experiment, spec, ["msp"], models=["digits-cnn"], quiet=True)
        curve.append(average_auroc(frame, "digits-cnn", "msp", "pgd-linf/both", 8 / 255))
    assert curve[0] >= curve[1] >= curve[2], curve


def test_cli_writes_attack_and_eps_columns_and_refuses_a_bad_budget(digits_run, run_cli, tmp_path):
    import pandas as pd

    experiment, _ = digits_run
    config = experiment.config.source
    done = run_cli("attack", config, "--postprocessors", "msp", "--eps", "0,8/255", "--steps", "5",
                   "--models", "digits-cnn", "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "AUROC eps=8/255" in done.stdout and "[0,1] pixel units before normalisation" in done.stdout
    tidy = pd.read_csv(tmp_path / "out" / "attack_digits_pgd-linf-both.csv")
    assert {"attack", "eps", "gradient"} <= set(tidy.columns)
    assert set(tidy.attack) == {"none", "pgd-linf/both"} and set(tidy.eps) == {0.0, 8 / 255}
    assert (tmp_path / "out" / "attack_digits_pgd-linf-both.png").is_file()
    bad = run_cli("attack", config, "--eps", "8/0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "8/0" in bad.stderr
