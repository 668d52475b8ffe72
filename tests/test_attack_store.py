"""Attacks in the results store (table ``attacks``) and `oodbench leaderboard --attack`: the
leaderboard's attacked rows are the attack command's numbers, clean cells and the clean
leaderboard stay as they were, a killed attack run keeps what it wrote and a rerun resumes,
and a store written before the table existed still opens."""

from __future__ import annotations

import io
import sqlite3

import pandas as pd
import pytest

from oodbench.cli import main
from tests.conftest import digits_config

KEYS = ["model", "checkpoint", "postprocessor", "dataset", "group", "metric", "fpr_convention", "attack", "eps"]
ATTACK = ["--postprocessors", "msp,cfood", "--eps", "0,8/255", "--steps", "2", "--models", "digits-cnn"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, session_cache):
    """A finished digits run (64 images a split) of msp and cfood: its config and store."""
    from oodbench.benchmark.runner import run_experiment

    folder = tmp_path_factory.mktemp("attack_store")
    path = digits_config(folder, postprocessors=["msp", "cfood"], limit=64, cache_dir=str(session_cache))
    run_experiment(path, quiet=True)
    return path, folder / "results.sqlite"


def store_rows(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return sorted(db.execute("SELECT * FROM cells").fetchall()) + sorted(db.execute("SELECT * FROM results"))


def test_leaderboard_attack_rows_are_the_attack_commands_and_clean_stays(digits_store, capsys, tmp_path):
    config, store = digits_store
    clean_text = cli(capsys, "leaderboard", "--results", store)
    clean_csv = cli(capsys, "leaderboard", "--results", store, "--format", "csv")
    assert clean_text[0] == clean_csv[0] == 0
    refused = cli(capsys, "leaderboard", "--results", store, "--attack")  # nothing attacked yet
    assert refused[0] == 2 and "no attack results" in refused[2] and refused[2].strip().count("\n") == 0
    clean_cells = store_rows(store)
    # a name that is not part of the run: one line, exit 2, nothing written (no empty CSV over an old one)
    for wrong in (["--models", "nope"], ["--postprocessors", "msp,nope"]):
        code, _, err = cli(capsys, "attack", config, *ATTACK, *wrong, "--output", tmp_path / "wrong")
        assert code == 2 and "'nope' is not a" in err and err.strip().count("\n") == 0, err
        assert not (tmp_path / "wrong").exists() and store_rows(store) == clean_cells
    refused = cli(capsys, "leaderboard", "--results", store, "--postprocessors", "msp,nope")
    assert refused[0] == 2 and "no results for postprocessor 'nope'" in refused[2]

    code, printed, err = cli(capsys, "attack", config, *ATTACK, "--format", "csv", "--output", tmp_path / "out")
    assert code == 0, err
    code, markdown, err = cli(capsys, "attack", config, *ATTACK, "--output", tmp_path / "out")  # the cached images
    assert code == 0 and "on the --limit 64 run (at most 64 images per split)" in markdown, err
    attacked = pd.read_csv(io.StringIO(printed), keep_default_na=False)
    code, shown, err = cli(capsys, "leaderboard", "--results", store, "--attack", "--format", "csv")
    assert code == 0, err
    board = pd.read_csv(io.StringIO(shown), keep_default_na=False)
    assert {"attack", "eps", "gradient"} <= set(board.columns) and set(board.attack) == {"none", "pgd-linf/both"}
    merged = attacked.merge(board, on=KEYS, suffixes=("_printed", "_stored"), validate="one_to_one")
    assert len(merged) == len(attacked) == len(board) > 0
    assert merged.value_printed.tolist() == merged.value_stored.tolist()  # float64 through SQLite, exactly
    average = merged[(merged.dataset == "average") & (merged.metric == "auroc") & (merged.postprocessor == "msp")]
    by_eps = dict(zip(average.eps, average.value_stored))  # the clean row's eps is 0, as the eps = 0 attack's
    assert by_eps[8 / 255] < by_eps[0] - 0.01  # the stored rows are attacked numbers, not clean ones again

    code, table, _ = cli(capsys, "leaderboard", "--results", store, "--attack")
    assert code == 0
    assert "AUROC eps=8/255" in table and "FPR@95 eps=0" in table and "cfood†" in table and "msp†" not in table
    for words in ("PGD LINF", "in [0,1] pixel units before normalisation", "2 steps x 1 restart(s)", "target both",
                  "FPR@95 ID-positive (classic)"):
        assert words in table
    figures = board[(board.dataset == "average") & (board.postprocessor == "msp")]
    figures = figures.set_index(["attack", "eps", "metric"])
    auroc = 100 * figures.loc[("pgd-linf/both", 8 / 255, "auroc")].value
    assert f"{auroc:.2f}" in table  # the markdown shows the stored number

    assert store_rows(store) == clean_cells  # clean cells untouched
    assert cli(capsys, "leaderboard", "--results", store) == clean_text
    after = cli(capsys, "leaderboard", "--results", store, "--format", "csv")
    assert after == clean_csv
    tidy = pd.read_csv(io.StringIO(after[1]), keep_default_na=False)
    assert list(tidy.columns[-2:]) == ["attack", "eps"] and set(tidy.attack) == {"none"} and set(tidy.eps) == {0}


def test_a_killed_attack_run_keeps_its_rows_and_a_rerun_resumes(digits_store, capsys, tmp_path):
    from oodbench.tasks.attacks.evaluate import attack_experiment
    from oodbench.tasks.attacks.spec import parse_attack
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.tasks.attacks.record import store_rows as rows_of
    from oodbench.storage.store import ResultStore

    config, path = digits_store
    experiment = CachedExperiment.open(config)
    spec = parse_attack({"eps": [0, 4 / 255, 8 / 255], "steps": 2, "target": "out"})
    store, written = ResultStore(path), []

    def sink(block):
        if len(written) == 2:  # the clean rows and eps 0 are in; killed during 4/255
            raise KeyboardInterrupt
        store.write_attack(rows_of(block, "digits", experiment.plan.fingerprint, spec, "classic"))
        written.append(len(block))

    with pytest.raises(KeyboardInterrupt):
        attack_experiment(experiment, spec, ["msp"], ["digits-cnn"], quiet=True, sink=sink)
    kept = store.frame("attacks")
    kept = kept[kept.threat.str.contains('"out"')]
    assert len(kept) == sum(written) and sorted(set(kept.eps)) == [0.0]
    frame = attack_experiment(experiment, spec, ["msp"], ["digits-cnn"], quiet=True,
                              sink=lambda block: store.write_attack(rows_of(block, "digits",
                                                                            experiment.plan.fingerprint, spec,
                                                                            "classic")))
    again = store.frame("attacks")
    again = again[again.threat.str.contains('"out"')]
    assert len(again) == len(frame)  # the rerun replaced the kept rows, no duplicates
    store.close()


def test_a_store_without_the_attacks_table_still_opens(digits_store, capsys, tmp_path):
    from oodbench.storage.schema import SCHEMA_VERSION
    from oodbench.storage.store import ResultStore

    _, path = digits_store
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as source, sqlite3.connect(old) as target:
        source.backup(target)
    with sqlite3.connect(old) as db:
        db.executescript("DROP TABLE attacks; PRAGMA user_version = 4;")
    before = cli(capsys, "leaderboard", "--results", old, "--format", "csv")
    assert before[0] == 0 and "none" in before[1]
    code, _, err = cli(capsys, "leaderboard", "--results", old, "--attack")
    assert code == 2 and "no attack results" in err
    ResultStore(old).close()  # opened for writing: upgraded in place, rows kept
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM attacks").fetchone()[0] == 0
    assert store_rows(old) == store_rows(path)
