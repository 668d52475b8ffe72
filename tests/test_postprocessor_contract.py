"""Contract tests run for every registered postprocessor — built-ins and plugins alike.

Each method is fitted and scored on real outputs of the built-in `digits-cnn` (ID digits
0-5 vs Gaussian-noise images, an easy case) and must give one finite, deterministic
score per sample, higher for ID; its defaults and search space must be valid.

A method that reads auxiliary model outputs (``needs_extras``, e.g. ``kl_gaussian``'s
``mu`` and ``logvar``) cannot score the digits model, which has none: it must fail in
one line naming what is missing (`MissingExtras`, a cell the runner marks missing).
Its shape, finiteness and determinism are checked with stand-in extras (the penultimate
features); which direction is ID depends on a model trained for those extras, so its
"higher for ID" is tested against its formula in its own tests (tests/test_api.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench.benchmark.jobs import RunContext, get_model, split_outputs
from oodbench.benchmark.plan import benchmark_splits, search_space_for
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import load_dataset
from oodbench.errors import MissingExtras, OodbenchError
from oodbench.metrics.detection import auroc
from oodbench.models.adapter import ModelContext, ModelSpec
from oodbench.postprocessors.base import InvalidHyperparameter, grid
from oodbench.registry import POSTPROCESSORS, load_plugin_file
from tests.conftest import NOT_ON_DIGITS

PLUGIN = Path(__file__).parent / "plugins" / "margin_plugin.py"
load_plugin_file(PLUGIN)
COMPOSITES = ["react+ebo", "ash_p+mls", "scale+gen", "react+knn", "dice+mds", "react+pro_msp", "optfs+ebo",
              "odin+mls"]  # shaper+scorer, made on demand
ALL_NAMES = [entry.name for entry in POSTPROCESSORS.entries()] + COMPOSITES
NAMES = [name for name in ALL_NAMES if name not in NOT_ON_DIGITS]
SPLITS = ("id:train", "id:val", "id:test", "far:gaussian")


@pytest.fixture(scope="module")
def digits_outputs(session_cache):
    benchmark = load_benchmark("digits")
    splits = benchmark_splits(benchmark, "train")
    context = RunContext(ModelSpec("digits-cnn"), ModelContext(session_cache, session_cache), benchmark.image,
                         str(session_cache), batch_size=64, num_workers=0)
    model = get_model(context.model, context.model_context)
    outputs = {}
    for name in SPLITS:
        outputs[name], _ = split_outputs(context, splits[name])
        outputs[name].model, outputs[name].inputs = model, load_dataset(splits[name].ref, session_cache,
                                                                        benchmark.image, ood=splits[name].ood)
        outputs[name].meta["batch_size"] = context.batch_size
    return outputs


def fitted(name, outputs, **params):
    cls = POSTPROCESSORS.get(name)
    method = cls(**params)
    if cls.needs_fit:
        method.fit(with_extras(cls, outputs["id:train"]), with_extras(cls, outputs["id:val"]))
    return method


def with_extras(cls, outputs):
    """`outputs` with stand-ins for the extras `cls` needs (the penultimate features)."""
    if not cls.needs_extras:
        return outputs
    return replace(outputs, extras={name: outputs.features for name in cls.needs_extras})


def test_plugin_is_in_the_registry():
    assert "margin" in NAMES
    assert POSTPROCESSORS.entry("margin").origin == "file margin_plugin.py"


@pytest.mark.parametrize("name", NAMES)
def test_scores_shape_finite_deterministic(name, digits_outputs):
    method = fitted(name, digits_outputs)
    test = with_extras(type(method), digits_outputs["id:test"])
    first = torch.as_tensor(method.score(test))
    second = torch.as_tensor(method.score(test))
    assert first.shape == (len(test),)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


# A method whose published defaults do not separate this toy case is checked with a value
# of its own search list (the direction, higher = ID, is what this test is about): AdaScale-A
# with OpenOOD's percentile [75, 85] reaches AUROC 0.79 here, 0.995 with [60, 65]; its
# formula is tested in tests/test_layer_methods.py.
# NAC-UE's defaults (the reference's CIFAR-10 ResNet-18 avgpool setting) reach 0.74 here, 0.85
# with O = 10 of its search list; LINe's (CIFAR-10 DenseNet: p_w = p_a = 90) 0.74, 0.84 with its
# ImageNet p_w = p_a = 10 (its absolute clip at 1.0 cuts most of these features, median 1.0).
DIRECTION_CHECK_PARAMS = {"adascale_a": {"percentile": [60, 65]}, "nac_ue": {"O": 10}, "nac": {"O": [10]},
                          "line": {"p_w": 10, "p_a": 10}}


@pytest.mark.parametrize("name", [n for n in NAMES if not POSTPROCESSORS.get(n).needs_extras])
def test_higher_means_in_distribution(name, digits_outputs):
    method = fitted(name, digits_outputs, **DIRECTION_CHECK_PARAMS.get(name, {}))
    id_scores = torch.as_tensor(method.score(digits_outputs["id:test"])).numpy()
    ood_scores = torch.as_tensor(method.score(digits_outputs["far:gaussian"])).numpy()
    is_ood = np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)]
    assert auroc(np.r_[id_scores, ood_scores], is_ood) > 0.8


GRID_METHODS = [n for n in NAMES if POSTPROCESSORS.get(n).grid_params and not POSTPROCESSORS.get(n).needs_extras]


@pytest.mark.parametrize("name", GRID_METHODS)
def test_a_search_grid_scores_exactly_what_each_combination_scores(name, digits_outputs):
    """``score_grid`` over the shipped search lists of its ``grid_params`` (work shared between
    the combinations) gives bit for bit each combination's own ``score``, or its error.

    Each list is thinned to its first and last value: every way of sharing work (several
    base settings, several step sizes, a shorter K as the prefix of the largest) is still
    exercised, and invalid values sit at the lists' ends; PRO-GEN's full 336 combinations,
    each also run on its own, would cost minutes."""
    cls = POSTPROCESSORS.get(name)
    space = {k: v[:1] + v[1:][-1:] for k, v in search_space_for(name, cls).items() if k in cls.grid_params}
    combos = list(grid(space))
    outputs = digits_outputs["id:val"]
    together = fitted(name, digits_outputs).score_grid(outputs, combos)
    assert len(together) == len(combos) > 1
    for combo, scores in zip(combos, together):
        try:
            alone = fitted(name, digits_outputs, **combo).score(outputs)
        except InvalidHyperparameter as exc:
            assert isinstance(scores, InvalidHyperparameter) and str(scores) == str(exc), combo
            continue
        assert torch.equal(torch.as_tensor(scores), alone), combo


@pytest.mark.parametrize("name", list(NOT_ON_DIGITS))
def test_a_method_the_model_cannot_use_fails_in_one_line(name, digits_outputs):
    with pytest.raises(OodbenchError) as error:
        fitted(name, digits_outputs)
    assert NOT_ON_DIGITS[name] in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", [n for n in NAMES if POSTPROCESSORS.get(n).needs_extras])
def test_missing_extras_fail_in_one_line(name, digits_outputs):
    """The digits model has no extras: scoring fails naming the method and every missing extra."""
    cls = POSTPROCESSORS.get(name)
    with pytest.raises(MissingExtras) as error:
        fitted(name, digits_outputs).score(digits_outputs["id:test"])
    message = str(error.value)
    assert "\n" not in message and f"'{cls.name}'" in message
    assert all(extra in message for extra in cls.needs_extras)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_defaults_and_search_space_are_valid(name):
    cls = POSTPROCESSORS.get(name)
    space = search_space_for(name, cls)
    for key, values in space.items():
        assert key in cls.defaults, f"search key {key} is not a hyperparameter of {name}"
        assert isinstance(values, list) and values
    for combo in grid(space):
        assert cls(**combo).params == {**cls.defaults, **combo}
    cls.check_search_space(space, source=f"the search lists of {name}")
    with pytest.raises(Exception, match="no hyperparameter"):
        cls(not_a_parameter=1)


BUILTIN = [entry.name for entry in POSTPROCESSORS.entries() if entry.origin == "builtin"]
OUT_OF_ANY_RANGE = [-1e9, float("nan"), "text", None, True, [1]]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_hyperparameter_has_a_range(name):
    """A built-in method says what each hyperparameter accepts, its default and every shipped
    search value (configs/postprocessors/<name>.yaml) are in it, and a value outside is one line
    naming the method, the parameter and the range."""
    cls = POSTPROCESSORS.get(name)
    assert set(cls.ranges) == set(cls.defaults), f"{name}: hyperparameters without a range"
    for key, allowed in cls.ranges.items():
        assert allowed.accepts(cls.defaults[key]), f"{name}: the default {key}={cls.defaults[key]!r} is out of range"
        for value in search_space_for(name, cls).get(key, []):
            assert allowed.accepts(value), f"{name}: the shipped search value {key}={value!r} is out of range"
        refused = [value for value in OUT_OF_ANY_RANGE if not allowed.accepts(value)]
        assert refused, f"{name}: {key} accepts anything"
        with pytest.raises(OodbenchError) as error:
            cls(**{key: refused[0]})
        assert str(error.value) == (f"postprocessor '{cls.name}': {key}={refused[0]!r} is not allowed; "
                                    f"{key} must be {allowed}")
