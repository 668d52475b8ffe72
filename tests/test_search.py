"""Hyperparameter search on cached outputs and the fit-state cache.

- the search picks the combination with the best validation AUROC on a constructed case
  where it is known, the first listed on ties, and skips values invalid on the outputs;
- a single-element search space gives exactly the plain run with that value;
- a second run loads the fitted state instead of fitting again; a corrupt entry refits;
- on the built-in benchmark, every method of this family gets chosen params, and ViM's
  dimensions at or above the 128-dim digits features are skipped and reported.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from oodbench.benchmark import jobs, plan, runner, search
from oodbench.storage.caches import FitStateCache
from oodbench.errors import OodbenchError
from oodbench.metrics.detection import auroc
from oodbench.models.adapter import ModelContext, ModelSpec
from oodbench.postprocessors.base import InvalidHyperparameter, Outputs, Postprocessor
from oodbench.postprocessors.subspace import ViM
from oodbench.registry import POSTPROCESSORS
from oodbench.storage.store import ResultStore

from tests.conftest import digits_config

FEATURE_METHODS = ["mds", "rmds", "knn", "vim", "react", "ash", "scale", "dice", "gradnorm"]


class ColumnScore(Postprocessor):
    """Scores with one feature column, times a sign: the search must find the separating one."""

    name = "column_score"
    needs_features = True
    needs_fit = True
    defaults = {"column": 0, "sign": 1}

    def fit(self, train: Outputs, val: Outputs) -> None:
        if self.params["column"] >= train.features.shape[1]:
            raise InvalidHyperparameter(f"column={self.params['column']} is beyond the features")
        self.offset = train.features.mean()

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.params["sign"] * (outputs.features[:, self.params["column"]] - self.offset)


def constructed_case(seed: int = 0):
    """Column 2 separates ID (high) from OOD (low) perfectly; column 3 separates half as well;
    columns 0, 1 are noise; column 4 is a copy of column 2 (a tie with it)."""
    gen = torch.Generator().manual_seed(seed)

    def outputs(n: int, ood: bool) -> Outputs:
        noise = torch.randn(n, 4, generator=gen)
        signal = torch.rand(n, generator=gen) + (0.0 if ood else 2.0)
        partial = torch.rand(n, generator=gen) + (0.0 if ood else 0.5)
        features = torch.stack([noise[:, 0], noise[:, 1], signal, partial, signal.clone()], dim=1)
        return Outputs(logits=torch.zeros(n, 3), features=features, labels=torch.full((n,), -1 if ood else 0))

    return outputs(50, False), outputs(40, False), [outputs(30, True), outputs(20, True)]


def run_search(space, fit_cache=None):
    train, val, ood_val = constructed_case()
    fit = lambda method: jobs.fit_cached(method, train, val, fit_cache, ["train", "val"])  # noqa: E731
    return search.search_hyperparameters(ColumnScore, {}, space, val, ood_val, fit)


def test_search_picks_the_known_best_combination():
    chosen, note = run_search({"column": [0, 1, 3, 2], "sign": [-1, 1]})
    assert chosen == {"column": 2, "sign": 1} and note is None
    train, val, ood_val = constructed_case()
    best = ColumnScore(column=2, sign=1)
    best.fit(train, val)
    assert search.validation_auroc(best, val, ood_val) == 1.0
    wrong_sign = ColumnScore(column=2, sign=-1)
    wrong_sign.fit(train, val)
    assert search.validation_auroc(wrong_sign, val, ood_val) == 0.0


def test_ties_go_to_the_first_listed_value():
    assert run_search({"column": [4, 2]})[0] == {"column": 4}
    assert run_search({"column": [2, 4]})[0] == {"column": 2}


def test_invalid_values_are_skipped_and_reported():
    chosen, note = run_search({"column": [7, 3, 9]})
    assert chosen == {"column": 3}
    assert note == "search skipped column=7; column=9 (column=7 is beyond the features)"
    with pytest.raises(OodbenchError, match="every searched combination is invalid"):
        run_search({"column": [7, 9]})


class ColumnGrid(Postprocessor):
    """ColumnScore without a fit, scoring every column of a search in one ``score_grid`` call."""

    name = "column_grid"
    defaults = {"column": 0, "sign": 1}
    grid_params = ("column",)
    calls: list = []

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.params["sign"] * outputs.features[:, self.params["column"]]

    def score_grid(self, outputs, combos):
        ColumnGrid.calls.append([combo["column"] for combo in combos])
        return super().score_grid(outputs, combos)


def test_grid_params_are_scored_together_and_ties_still_go_to_the_first_listed():
    _, val, ood_val = constructed_case()
    ColumnGrid.calls = []
    space = {"column": [0, 4, 3, 2], "sign": [-1, 1]}  # the grid key first: not the order of the calls
    chosen, _ = search.search_hyperparameters(ColumnGrid, {}, space, val, ood_val, lambda method: None)
    assert chosen == {"column": 4, "sign": 1}  # column 4 ties with 2 and is listed first
    assert ColumnGrid.calls == [[0, 4, 3, 2]] * 6  # one call per sign and split (ID val, 2 OOD val)
    assert search.split_grid(ColumnScore, space) == (space, [{}])  # grid params that change a fit are not shared


class BrokenColumns(ColumnGrid):
    """Column 1 NaN on the second OOD set, column 2 the wrong shape there, as integers elsewhere."""

    name = "broken_columns"

    def score(self, outputs: Outputs) -> torch.Tensor:
        scores = super().score(outputs)
        if outputs.meta.get("second") and self.params["column"] == 1:
            return torch.full_like(scores, torch.nan)
        if outputs.meta.get("second") and self.params["column"] == 2:
            return scores[:-1]
        return scores.round().long() if self.params["column"] == 3 else scores


def test_validation_aurocs_checked_together_equal_one_by_one_and_name_the_first_broken():
    """The batched contract check: each combination's AUROC as `validation_auroc` of it alone
    (integer scores converted as alone), and the first broken (combination, set) in order named."""
    _, val, ood_val = constructed_case()
    ood_val[1].meta["second"] = True
    method = BrokenColumns()
    together = search.validation_aurocs(method, [{"column": c} for c in (0, 3, 4)], val, ood_val)
    assert together == [search.validation_aurocs(method, [{"column": c}], val, ood_val)[0] for c in (0, 3, 4)]
    alone = [search.finite_scores(BrokenColumns(column=3).score(o), "", len(o)) for o in (val, *ood_val)]
    labels = np.r_[np.zeros(len(val), bool), np.ones(sum(len(o) for o in ood_val), bool)]
    assert together[1] == auroc(np.concatenate(alone), labels)  # integer scores, converted one by one
    with pytest.raises(search.NonFiniteScores, match="on OOD val"):
        search.validation_aurocs(method, [{"column": c} for c in (0, 1, 2)], val, ood_val)
    with pytest.raises(search.ScoreShapeError, match=r"shape \[\d+\] on OOD val"):
        search.validation_aurocs(method, [{"column": c} for c in (0, 2, 1)], val, ood_val)


def test_fit_state_cache_round_trip_and_corruption(tmp_path):
    cache = FitStateCache(tmp_path)
    train, val, _ = constructed_case()
    method = ColumnScore(column=2)
    jobs.fit_cached(method, train, val, cache, ["a", "b"])
    key = FitStateCache.key(method, ["a", "b"])
    assert cache.load(key) == {"offset": method.offset}
    assert FitStateCache.key(ColumnScore(column=3), ["a", "b"]) != key  # fit_params None: every param counts
    assert FitStateCache.key(method, ["a", "c"]) != key
    assert FitStateCache.key(ViM(dim=3), ["a"]) == FitStateCache.key(ViM(dim=3), ["a"])
    cache.path(key).write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="is invalid"):
        assert cache.load(key) is None
    assert not cache.path(key).exists()


def _cells(path):
    store = ResultStore(path, readonly=True)
    cells = store.frame("cells")
    results = store.frame("results")
    store.close()
    return cells, results


def _run(tmp_path, name, **config):
    path = digits_config(tmp_path, **config)
    config_path = path.with_name(f"{name}.yaml")
    path.rename(config_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner.run_experiment(config_path, quiet=True)
    return _cells(config["results"])


def test_single_element_space_equals_the_plain_run(tmp_path, session_cache, monkeypatch):
    """A search over one value per hyperparameter scores exactly like --no-search with that value."""
    plain = {"knn": {"k": 100}, "react": {"percentile": 95}, "vim": {"dim": 32}}
    common = dict(postprocessors=list(plain), cache_dir=str(session_cache), data_root=str(session_cache))
    _, plain_results = _run(tmp_path, "plain", search=False, params=plain, results=str(tmp_path / "plain.sqlite"),
                            **common)
    spaces = {name: {key: [value] for key, value in params.items()} for name, params in plain.items()}
    monkeypatch.setattr(plan, "search_space_for", lambda name, cls, conventions=None: spaces[name])
    searched_cells, searched_results = _run(tmp_path, "searched", search=True,
                                            results=str(tmp_path / "searched.sqlite"), **common)
    for row in searched_cells.itertuples():
        assert row.status == "done"
        # the stored params are the method's whole setting: its defaults (e.g. KNN's index: flat) and the value
        assert json.loads(row.params) == {**POSTPROCESSORS.get(row.postprocessor).defaults, **plain[row.postprocessor]}
    columns = ["postprocessor", "dataset", "metric", "value"]
    left = plain_results[columns].sort_values(columns[:3]).reset_index(drop=True)
    right = searched_results[columns].sort_values(columns[:3]).reset_index(drop=True)
    assert len(left) == len(right) > 0
    assert (left[columns[:3]] == right[columns[:3]]).all().all()
    np.testing.assert_array_equal(left.value.to_numpy(), right.value.to_numpy())


def test_second_run_loads_the_fit_instead_of_refitting(tmp_path, session_cache, monkeypatch):
    fits = []
    original = ViM.fit
    monkeypatch.setattr(ViM, "fit", lambda self, train, val: (fits.append(self.params["dim"]),
                                                             original(self, train, val))[1])
    jobs.get_model(ModelSpec("digits-cnn"), ModelContext(session_cache, session_cache))  # trained once
    cache_dir = tmp_path / "cache"
    models = session_cache / "models"
    (cache_dir / "models").mkdir(parents=True)
    for checkpoint in models.glob("*.pt"):  # reuse the trained built-in models, not their outputs
        (cache_dir / "models" / checkpoint.name).symlink_to(checkpoint)
    common = dict(postprocessors=["vim"], search=False, params={"vim": {"dim": 16}}, cache_dir=str(cache_dir),
                  data_root=str(session_cache))
    _, first = _run(tmp_path, "first", results=str(tmp_path / "first.sqlite"), **common)
    assert fits == [16]
    assert list((cache_dir / "fits").rglob("*.pt"))
    _, second = _run(tmp_path, "second", results=str(tmp_path / "second.sqlite"), **common)
    assert fits == [16]  # loaded from the fit-state cache
    np.testing.assert_array_equal(first.sort_values(["dataset", "metric"]).value.to_numpy(),
                                  second.sort_values(["dataset", "metric"]).value.to_numpy())


def test_digits_search_chooses_params_for_every_feature_method(run_cli, tmp_path):
    results = tmp_path / "digits.sqlite"
    config = digits_config(tmp_path, postprocessors=FEATURE_METHODS, search=True, results=str(results))
    done = run_cli("run", config, "--show-params", "--wide")
    assert done.returncode == 0, done.stderr
    cells, _ = _cells(results)
    by_name = {row.postprocessor: row for row in cells.itertuples()}
    assert sorted(by_name) == sorted(FEATURE_METHODS)
    assert all(row.status == "done" for row in by_name.values()), cells[["postprocessor", "reason"]]
    assert json.loads(by_name["vim"].params)["dim"] in (16, 32, 64)
    assert "dim=128" in by_name["vim"].reason and "dim=1000" in by_name["vim"].reason
    assert json.loads(by_name["knn"].params)["k"] in (50, 100, 200, 500)
    assert json.loads(by_name["react"].params)["percentile"] in (85, 90, 95, 99)
    assert json.loads(by_name["ash"].params)["variant"] == "b"
    for name in FEATURE_METHODS:
        line = next(line for line in done.stdout.splitlines() if f"| {name} " in line)
        params = json.loads(by_name[name].params)
        assert all(f"{key}={value}" in line for key, value in params.items()), line
    board = run_cli("leaderboard", "--results", results, "--show-params")
    assert board.returncode == 0 and "dim=" in board.stdout and "percentile=" in board.stdout


def test_a_cell_whose_fit_state_is_cached_does_not_read_the_fit_split(tmp_path):
    """ScoreJob reads the (largest) fit split only for a fit the fit-state cache does not hold."""
    from types import SimpleNamespace

    from oodbench.storage.store import Cell

    train, val, ood_val = constructed_case()
    test = Outputs(logits=torch.zeros(30, 3), features=val.features[:30], labels=torch.zeros(30, dtype=torch.long))
    splits = {"id:fit": train, "id:val": val, "id:test": test, "far:a": ood_val[0]}
    context = SimpleNamespace(model_context=SimpleNamespace(cache_dir=tmp_path), model=SimpleNamespace(display="m"))
    job = jobs.ScoreJob(context, "column_score", {"column": 2}, {}, {}, {name: name for name in splits},
                        {"a": "far"})
    for expected in (["id:fit"], []):
        read = []
        load = lambda name: (read.append(name), splits[name])[1]  # noqa: E731
        cell = Cell("b", "m", "column_score", "s")
        job._score_with(cell, ColumnScore, None, load)
        assert [name for name in read if name == "id:fit"] == expected
        assert cell.metrics["a"]["auroc"] == 1.0
