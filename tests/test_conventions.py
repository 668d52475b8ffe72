"""Convention profiles (oodbench.benchmark.conventions): each OpenOOD rule against an independent
implementation of OpenOOD v1.5's code on fixed inputs, and the profile through a real CLI run.

The metric (trapezoid AUPR, OOD-positive FPR@95), temperature-fit, ODIN-table and PRO-units
rules are tested beside their functions (test_metrics.py, test_logit_postprocessors.py,
test_gradient_postprocessors.py); here: the profiles' data, the search order and its ties,
which split ReAct fits on, and the run, table and store.
"""

from __future__ import annotations

import sqlite3

import pytest
import torch

from oodbench.benchmark import search
from oodbench.benchmark.config import load_config
from oodbench.benchmark.plan import Plan, search_space_for
from oodbench.datasets.benchmarks import load_benchmark
from oodbench.benchmark.conventions import load_conventions
from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs, Postprocessor, grid
from oodbench.registry import POSTPROCESSORS
from tests.conftest import digits_config


def recursive_generator(lists, n):
    """OpenOOD v1.5's evaluation_api/evaluator.py order, written out: the last list varies slowest."""
    if n == 1:
        return [[x] for x in lists[0]]
    return [y + [x] for x in lists[n - 1] for y in recursive_generator(lists, n - 1)]


def test_openood_visits_combinations_in_its_recursive_generator_order():
    space = {"gamma": [0.01, 0.1, 0.5], "top_m": [10, 50], "eps": [1, 2]}
    expected = [dict(zip(space, values)) for values in recursive_generator(list(space.values()), len(space))]
    assert list(load_conventions("openood").combinations(space)) == expected
    assert list(load_conventions("paper").combinations(space)) == list(grid(space))


class TwoWayTie(Postprocessor):
    """Feature 0 separates ID from OOD; the combinations (a=1, b=2) and (a=2, b=1) score with it
    (a tie for the best validation AUROC), every other combination with noise."""

    name = "two_way_tie"
    defaults = {"a": 1, "b": 1}

    def score(self, outputs: Outputs) -> torch.Tensor:
        column = 0 if {self.params["a"], self.params["b"]} == {1, 2} else 1
        return outputs.features[:, column]


def tie_case():
    generator = torch.Generator().manual_seed(0)
    def side(shift):
        features = torch.randn(60, 2, generator=generator)
        features[:, 0] += shift
        return Outputs(logits=torch.zeros(60, 2), features=features, labels=torch.zeros(60, dtype=torch.long))
    return side(3.0), [side(0.0)]


@pytest.mark.parametrize("profile", ["paper", "openood"])
def test_search_ties_go_to_the_first_combination_the_profile_visits(profile):
    val, ood_val = tie_case()
    space = {"a": [1, 2], "b": [1, 2]}
    chosen, _ = search.search_hyperparameters(TwoWayTie, {}, space, val, ood_val, lambda method: None,
                                              load_conventions(profile).combinations)
    if profile == "openood":  # evaluator.hyperparam_search: `if auroc > max_auroc` over recursive_generator
        best, final = 0, None
        for values in recursive_generator(list(space.values()), len(space)):
            auroc = search.validation_auroc(TwoWayTie(**dict(zip(space, values))), val, ood_val)
            if auroc > best:
                best, final = auroc, dict(zip(space, values))
        assert chosen == final == {"a": 2, "b": 1}
    else:
        assert chosen == {"a": 1, "b": 2}  # itertools.product order: the first listed key slowest


def test_profiles_are_data_with_their_facts():
    openood, pro = load_conventions("openood"), load_conventions("pro")
    assert (openood.fpr, openood.aupr, openood.search_order) == ("openood", "trapezoid", "last_slowest")
    assert openood.method_params("odin", "cifar10") == {"input_std": [0.2470, 0.2435, 0.2616]}
    assert openood.method_params("odin", "digits") == {"input_std": [0.5, 0.5, 0.5]}  # OpenOOD's KeyError fallback
    assert openood.fit_split["react"] == "val" and openood.method_params("temp_scaling", "x") == {"fit": "openood"}
    assert pro.fpr == "openood" and pro.fit_split == openood.fit_split  # it extends openood
    assert search_space_for("pro_gen", POSTPROCESSORS.get("pro_gen"), pro) == {
        "gamma": [0.01, 0.1, 0.3, 0.5], "top_m": [10, 50, 100], "eps": [3e-4, 5e-4, 8e-4, 1e-3], "K": [1, 2, 3, 5]}
    assert pro.method_params("pro_ent", "cifar10") == {"eps_units": "normalized", "eps": 0.0014, "K": 2}
    for name in {*openood.params, *pro.params, *pro.search}:  # every entry is a valid setting of its method
        cls = POSTPROCESSORS.get(name)
        cls(**pro.method_params(name, "cifar10"))
        search_space_for(name, cls, pro)
    with pytest.raises(OodbenchError, match="did you mean: openood"):
        load_conventions("openod")


# OpenOOD v1.5's preprocessors/transform.py normalization_dict std, by the evaluator's id_name
OPENOOD_STD = {"cifar10": [0.2470, 0.2435, 0.2616], "cifar100": [0.2675, 0.2565, 0.2761],
               "imagenet": [0.229, 0.224, 0.225], "imagenet200": [0.229, 0.224, 0.225]}


def test_odin_and_iodin_read_the_id_datasets_std_on_every_benchmark():
    """OpenOOD's ODINPostprocessor looks its std up by config.dataset.name, the ID dataset's name (a
    full-spectrum run keeps it: fsood=True), else [0.5] * 3; IODINPostprocessor inherits it. Every
    built-in benchmark's ID dataset is itself, or for *_fs the benchmark it extends."""
    import yaml

    from oodbench.datasets.benchmarks import BENCHMARK_DIR

    openood = load_conventions("openood")
    benchmarks = sorted(BENCHMARK_DIR.glob("*.yaml"))
    assert {"cifar10_fs", "cifar100_fs", "imagenet_fs", "imagenet200_fs"} <= {p.stem for p in benchmarks}
    for path in benchmarks:
        id_name = yaml.safe_load(path.read_text()).get("extends", path.stem)
        expected = {"input_std": OPENOOD_STD.get(id_name, [0.5, 0.5, 0.5])}
        assert openood.method_params("odin", path.stem) == expected, path.stem
        assert openood.method_params("iodin", path.stem) == expected, path.stem
    assert load_conventions("paper").method_params("iodin", "cifar10") == {}  # the model's own std


def test_openood_profile_fixes_cfood_and_nnguide_and_sets_mds_ensembles_rules(tmp_path, session_cache):
    """cfood.yml and nnguide.yml have APS_mode: false (their postprocessor_args, no search);
    MDS-Ensemble reads the stem and divides the signed gradient by 0.5; NNGuide's bank is whole
    batches of the evaluator's 200; VRA fits on ID validation."""
    names = ["cfood", "nnguide", "mds_ensemble", "vra"]

    def plan_of(profile):
        config = load_config(digits_config(tmp_path, postprocessors=names, search=True), conventions=profile,
                             cache_dir=str(session_cache), data_root=str(session_cache))
        return Plan.resolve(config, load_benchmark("digits"), names)

    paper, openood = plan_of("paper"), plan_of("openood")
    assert paper.methods["cfood"].space == {"alpha": [0.1, 0.5, 1], "k": [0.001, 0.005, 0.01, 0.05]}
    assert openood.methods["cfood"].space == {} and openood.methods["nnguide"].space == {}
    cfood = POSTPROCESSORS.get("cfood")(**openood.methods["cfood"].params)
    assert (cfood.params["alpha"], cfood.params["k"]) == (0.1, 0.01)
    assert openood.methods["nnguide"].params == {"bank_batch": 200}
    assert paper.methods["nnguide"].params == {}  # the exact ceil(alpha N) bank
    assert openood.methods["mds_ensemble"].params == {"layers": "stem", "input_std": [0.5, 0.5, 0.5]}
    assert paper.methods["vra"].fit_split == "train" and openood.methods["vra"].fit_split == "val"
    for name in names:
        assert paper.cell_fingerprint(name, "m", "w") != openood.cell_fingerprint(name, "m", "w")


def test_an_experiments_params_replace_the_profiles(tmp_path, session_cache):
    """A value the experiment fixes replaces the profile's default for that method (no clash)."""
    from oodbench.benchmark.runner import check_config

    path = digits_config(tmp_path, postprocessors=["mds_ensemble", "odin"],
                         params={"mds_ensemble": {"layers": "stages"}, "odin": {"input_std": [0.3, 0.3, 0.3]}})
    config = load_config(path, conventions="openood", cache_dir=str(session_cache), data_root=str(session_cache))
    assert check_config(config) == ["mds_ensemble", "odin"]
    plan = Plan.resolve(config, load_benchmark("digits"), ["mds_ensemble", "odin"])
    assert plan.methods["mds_ensemble"].params == {"layers": "stages", "input_std": [0.5, 0.5, 0.5]}
    assert plan.methods["odin"].params == {"input_std": [0.3, 0.3, 0.3]}


def test_the_plan_fits_react_on_validation_and_keys_the_profile(tmp_path, session_cache):
    def plan_of(profile):
        config = load_config(digits_config(tmp_path, postprocessors=["react", "msp", "temp_scaling"]),
                             conventions=profile, cache_dir=str(session_cache), data_root=str(session_cache))
        return Plan.resolve(config, load_benchmark("digits"), ["react", "msp", "temp_scaling"])

    paper, openood = plan_of("paper"), plan_of("openood")
    assert paper.methods["react"].fit_split == "train" and openood.methods["react"].fit_split == "val"
    assert "id:train" not in openood.methods["react"].splits
    assert openood.methods["temp_scaling"].params == {"fit": "openood"}
    # TemperatureScalingPostprocessor.setup reads id_loader_dict['val'] alone: no train split is read
    assert openood.methods["temp_scaling"].fit_split == "val" and "id:train" not in openood.methods["temp_scaling"].splits
    assert paper.methods["temp_scaling"].fit_split == "train"
    assert openood.methods["msp"].setting == "default@openood" and paper.methods["msp"].setting == "default"
    for name in ("react", "msp", "temp_scaling"):
        assert paper.cell_fingerprint(name, "m", "w") != openood.cell_fingerprint(name, "m", "w")


def test_the_openood_profile_fits_on_validation_what_openoods_setup_fits_on_val(tmp_path, session_cache):
    """OpenOOD v1.5's setup of KLMatching and AdaScale (as TemperatureScaling, ReAct, VRA) reads
    id_loader_dict['val']: under openood those methods read no ID train split."""
    names = ["klm", "adascale_a", "adascale_l", "temp_scaling", "react", "gen_react", "pro_gen_react", "vra"]
    config = load_config(digits_config(tmp_path, postprocessors=names), conventions="openood",
                         cache_dir=str(session_cache), data_root=str(session_cache))
    plan = Plan.resolve(config, load_benchmark("digits"), names)
    assert {name: plan.methods[name].fit_split for name in names} == dict.fromkeys(names, "val")
    assert not [name for name in names if "id:train" in plan.methods[name].splits]


def logsumexp_rows(logits):
    import numpy as np

    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def openood_react(train, val, test):
    """ReactPostprocessor: clip at np.percentile of every ID validation activation (90), energy."""
    import numpy as np

    threshold = np.percentile(val.features.numpy().ravel(), 90)
    weight, bias = (t.double().numpy() for t in test.fc)
    return logsumexp_rows(np.minimum(test.features.double().numpy(), threshold) @ weight.T + bias)


def openood_vra(train, val, test):
    """VRAPostprocessor.setup: percentiles 10 and 90 of every ID validation activation; clip, energy."""
    import numpy as np

    activations = val.features.numpy().ravel()
    low, high = np.percentile(activations, 10), np.percentile(activations, 90)
    weight, bias = (t.double().numpy() for t in test.fc)
    return logsumexp_rows(np.clip(test.features.double().numpy(), low, high) @ weight.T + bias)


def openood_nnguide(train, val, test):
    """NNGuidePostprocessor.setup: train batches of 200 (the evaluator's), in order, until more
    than int(0.01 N) samples; x / ||x|| + 1e-10; mean of the 100 largest inner products x energy."""
    import numpy as np

    normalizer = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    features, logits = train.features.double().numpy(), train.logits.double().numpy()
    bank, bank_logits = [], []
    for start in range(0, len(features), 200):
        bank.append(normalizer(features[start:start + 200]))
        bank_logits.append(logits[start:start + 200])
        if len(bank) * 200 > int(len(features) * 0.01):
            break
    guides = np.concatenate(bank) * logsumexp_rows(np.concatenate(bank_logits))[:, None]
    similarities = np.sort(normalizer(test.features.double().numpy()) @ guides.T, axis=1)[:, ::-1]
    return similarities[:, :100].mean(axis=1) * logsumexp_rows(test.logits.double().numpy())


@pytest.mark.parametrize("name, reference", [("react", openood_react), ("vra", openood_vra),
                                             ("nnguide", openood_nnguide)])
def test_openood_profile_scores_the_run_as_openoods_code(tmp_path, session_cache, name, reference):
    """A digits run under openood scores its own cached outputs as OpenOOD's postprocessor,
    written out here in NumPy: ReAct and VRA fitted on ID validation, NNGuide's bank of whole
    train batches (200 of the 300 train samples where the exact share floors at K = 100)."""
    import numpy as np

    from oodbench.benchmark.jobs import RunContext, split_outputs
    from oodbench.benchmark.plan import benchmark_splits
    from oodbench.benchmark.runner import run_experiment
    from oodbench.storage.store import ResultStore

    config = load_config(digits_config(tmp_path, postprocessors=[name], limit=300), conventions="openood",
                         cache_dir=str(session_cache), data_root=str(session_cache))
    frame = run_experiment(config, quiet=True)
    fingerprint = frame.fingerprint.iloc[0]
    scores = ResultStore(config.results, readonly=True).read_scores([fingerprint])[0][fingerprint]["id_test"]
    benchmark = load_benchmark("digits")
    splits = benchmark_splits(benchmark, config.fit_split, config.limit)
    context = RunContext.of(config, config.models[0], benchmark.image, "cpu")
    train, val, test = (split_outputs(context, splits[split])[0] for split in ("id:train", "id:val", "id:test"))
    np.testing.assert_allclose(scores, reference(train, val, test), rtol=1e-5)
    paper = POSTPROCESSORS.get(name)()  # the paper profile's fit (train; NNGuide's exact bank) differs
    paper.fit(train, val)
    assert not np.allclose(paper.score(test).double().numpy(), scores, rtol=1e-4)


def test_cli_run_with_openood_conventions_names_them_and_keeps_its_own_cells(run_cli, tmp_path):
    config = digits_config(tmp_path, postprocessors=["msp", "react"], fit_split="val", limit=200)
    store = tmp_path / "results.sqlite"
    paper = run_cli("run", config)
    assert paper.returncode == 0, paper.stderr
    openood = run_cli("run", config, "--conventions", "openood", "--format", "markdown")
    assert openood.returncode == 0, openood.stderr
    assert "Conventions: openood (OpenOOD v1.5's code" in openood.stdout
    assert "Conventions: paper" in " ".join(paper.stdout.split())  # the text table wraps its caption
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT postprocessor, setting, fingerprint FROM cells").fetchall()
    by_setting = {(name, setting): fingerprint for name, setting, fingerprint in rows}
    assert set(by_setting) == {("msp", "default"), ("react", "default"), ("msp", "default@openood"),
                               ("react", "default@openood")}
    assert len(set(by_setting.values())) == 4  # every cell its own fingerprint
    board = run_cli("leaderboard", "--results", store, "--conventions", "openood", "--format", "markdown")
    assert board.returncode == 0, board.stderr
    assert "Conventions: openood" in board.stdout and "Conventions: paper" not in board.stdout
    assert "OOD as positive" in board.stdout  # the profile's FPR@95
