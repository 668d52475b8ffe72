"""The user's paths through the real CLI: the demo run, resuming, leaderboards from the
store alone, plugins from a file and from an installed package, and clear errors."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from oodbench.benchmark.runner import run_experiment
from oodbench.models.adapter import ModelAdapter
from oodbench.storage.store import ResultStore
from oodbench.benchmark.leaderboard import leaderboard_frame
from tests.conftest import REPO, compact_rows, digits_config

PLUGINS = Path(__file__).parent / "plugins"


def test_demo_run_prints_the_leaderboard(run_cli, tmp_path):
    """`make demo` runs exactly this command (with the default results path)."""
    result = run_cli("run", REPO / "configs/experiments/digits.yaml", "--results", tmp_path / "demo.sqlite")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "FPR@95 with ID as positive" in table
    for name in ("digits-cnn", "digits-cnn-robust", "msp", "ebo", "gen", "klm", "temp_scaling",
                 "digits_6_9", "textures", "gaussian", "uniform", "near-OOD", "far-OOD"):
        assert name in table
    assert max(map(len, table.splitlines())) <= 100
    rows = compact_rows(table)
    listed = yaml.safe_load((REPO / "configs/experiments/digits.yaml").read_text())["postprocessors"]
    for model in ("digits-cnn", "digits-cnn-robust"):
        block = [r for r in rows if r["model"] == model]
        assert len(block) == len(listed)
        scored = [r for r in block if r["near AUROC"][:1].isdigit()]
        assert block[:len(scored)] == scored  # unscored (failed, missing) rows last
        near = [float(r["near AUROC"].rstrip("*")) for r in scored]
        assert near == sorted(near, reverse=True)  # ranked by near-OOD AUROC within the model
    scored = [r for r in rows if r["near AUROC"][:1].isdigit()]
    best = max(float(r["near AUROC"].rstrip("*")) for r in scored)
    assert all(r["near AUROC"].endswith("*") == (float(r["near AUROC"].rstrip("*")) == best) for r in scored)
    assert "robust vs standard, near-OOD AUROC" in table
    tables = tmp_path / "tables" / "digits"
    assert f"full tables (Markdown, LaTeX, CSV): {tables / 'leaderboard'}.{{md,tex,csv}}" in result.stderr
    assert {p.name for p in tables.iterdir()} == {"leaderboard.md", "leaderboard.tex", "leaderboard.csv"}


def count_forwards(monkeypatch) -> list[int]:
    """Images passed through models' forward (a run's compatibility check passes one per model)."""
    calls = [0]
    original = ModelAdapter.forward

    def counting(self, x):
        calls[0] += x.shape[0]
        return original(self, x)

    monkeypatch.setattr(ModelAdapter, "forward", counting)
    return calls


def test_outputs_are_computed_once(monkeypatch, tmp_path, session_cache):
    calls = count_forwards(monkeypatch)
    config = digits_config(tmp_path, postprocessors=["msp", "ebo", "klm", "gen"], search=True)
    first = run_experiment(config, cache_dir=str(tmp_path / "cache"), quiet=True)
    assert calls[0] > 0
    calls[0] = 0
    # a new results store, the same output cache: every cell is recomputed, no forward pass
    second = run_experiment(config, cache_dir=str(tmp_path / "cache"), results=str(tmp_path / "other.sqlite"), quiet=True)
    assert calls[0] == 1  # the one-image check that the model fits the benchmark; no extraction
    pd.testing.assert_frame_equal(first.drop(columns="tags"), second.drop(columns="tags"))
    # the same store: finished cells are skipped
    calls[0] = 0
    third = run_experiment(config, cache_dir=str(tmp_path / "cache"), quiet=True)
    assert calls[0] == 1
    pd.testing.assert_frame_equal(first, third)


def test_rerun_writes_no_duplicate_rows(run_cli, tmp_path):
    import sqlite3

    config = digits_config(tmp_path)
    assert run_cli("run", config).returncode == 0
    db = sqlite3.connect(tmp_path / "results.sqlite")
    before = db.execute("SELECT count(*), sum(value) FROM results").fetchone()
    assert run_cli("run", config).returncode == 0
    assert db.execute("SELECT count(*), sum(value) FROM results").fetchone() == before
    # one row per (model, postprocessor, dataset, metric): 2 methods x (4 OOD sets x 5 metrics + acc)
    assert before[0] == 2 * (4 * 5 + 1)


def test_leaderboard_rebuilds_from_the_store_alone(run_cli, tmp_path):
    config = digits_config(tmp_path)
    run = run_cli("run", config)
    assert run.returncode == 0, run.stderr
    store = tmp_path / "results.sqlite"
    # no cache at all: nothing but the store is read
    env = {"OODBENCH_CACHE": str(tmp_path / "empty-cache")}
    markdown = run_cli("leaderboard", "--results", store, env=env)
    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout.strip() == run.stdout.strip()
    assert not (tmp_path / "empty-cache").exists()
    csv = run_cli("leaderboard", "--results", store, "--format", "csv", "--output", tmp_path / "t.csv", env=env)
    assert csv.returncode == 0, csv.stderr
    assert csv.stdout.strip() == (tmp_path / "t.csv").read_text().strip()
    tidy = pd.read_csv(tmp_path / "t.csv")
    assert list(dict.fromkeys(tidy.postprocessor)) == ["ebo", "msp"]  # sorted: not the order cells finished in
    board = leaderboard_frame(ResultStore(store, readonly=True), "digits")
    for row in board.to_dict("records"):
        mine = tidy[tidy.fingerprint == row["fingerprint"]]
        for column in ("digits_6_9", "textures", "far-OOD", "average"):
            at = mine[mine.dataset == column]
            assert at[at.metric == "auroc"].value.item() == pytest.approx(row[f"{column}|auroc"], abs=1e-12)
            classic = at[(at.metric == "fpr95") & (at.fpr_convention == "classic")]
            assert classic.value.item() == pytest.approx(row[f"{column}|fpr"], abs=1e-12)
    latex = run_cli("leaderboard", "--results", store, "--format", "latex", "--fpr", "openood", env=env)
    assert "\\begin{tabular}" in latex.stdout and "OpenOOD v1.5" in latex.stdout
    params = run_cli("leaderboard", "--results", store, "--show-params", env=env)
    assert "temperature=1.0" in params.stdout
    # one filter spelling on every command: a comma list, or the option repeated, singular or plural
    filtered = [run_cli("leaderboard", "--results", store, *flags, "--format", "csv", env=env).stdout
                for flags in (["--postprocessors", "ebo,msp"], ["--postprocessor", "ebo", "--postprocessors", "msp"],
                              ["--postprocessor", "ebo"])]
    assert filtered[0] == filtered[1] == csv.stdout and filtered[2] != csv.stdout
    assert set(pd.read_csv(io.StringIO(filtered[2])).postprocessor) == {"ebo"}


def test_averages_are_unweighted_means(tmp_path):
    frame = run_experiment(digits_config(tmp_path), cache_dir=str(tmp_path / "cache"), quiet=True)
    row = frame.iloc[0]
    far = ["textures", "gaussian", "uniform"]
    assert row["far-OOD|auroc"] == pytest.approx(sum(row[f"{d}|auroc"] for d in far) / 3)
    assert row["near-OOD|fpr"] == pytest.approx(row["digits_6_9|fpr"])
    assert row["average|auroc"] == pytest.approx(sum(row[f"{d}|auroc"] for d in far + ["digits_6_9"]) / 4)


def test_plugin_file_is_listed_and_ranked(run_cli, tmp_path):
    plugin = PLUGINS / "margin_plugin.py"
    listing = run_cli("list", "postprocessors", "--plugin", plugin)
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if l.startswith("margin"))
    assert "file margin_plugin.py" in line and "logits" in line
    config = digits_config(tmp_path, postprocessors=["msp", "margin"])
    run = run_cli("run", config, "--plugin", plugin)
    assert run.returncode == 0, run.stderr
    assert [r["postprocessor"] for r in compact_rows(run.stdout)].count("margin") == 1
    # a plugin file's methods join a run whose list does not name them (README: `--plugin my_score.py`)
    config = digits_config(tmp_path, postprocessors=["msp"], results=str(tmp_path / "unlisted.sqlite"))
    run = run_cli("run", config, "--plugin", plugin)
    assert run.returncode == 0, run.stderr
    assert sorted(r["postprocessor"] for r in compact_rows(run.stdout)) == ["margin", "msp"]


def test_broken_plugin_is_reported_and_the_others_work(run_cli):
    listing = run_cli("list", "postprocessors", "--plugin", PLUGINS / "broken_plugin.py",
                      "--plugin", PLUGINS / "margin_plugin.py")
    assert listing.returncode == 0
    assert "broken_plugin.py failed to import: RuntimeError" in listing.stderr
    assert any(l.startswith("margin") for l in listing.stdout.splitlines())
    assert "Traceback" not in listing.stderr


@pytest.fixture(scope="module")
def installed_plugin_package(tmp_path_factory) -> Path:
    """A tiny package declaring an `oodbench.postprocessors` entry point, pip-installed
    into a temporary folder (no network: the build uses this environment's setuptools)."""
    root = tmp_path_factory.mktemp("plugin-pkg")
    source = root / "src"
    (source / "oodbench_topk").mkdir(parents=True)
    (source / "oodbench_topk" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import oodbench


        class TopKMass(oodbench.Postprocessor):
            """Softmax mass of the two most likely classes."""

            def score(self, outputs):
                return torch.softmax(outputs.logits, dim=1).topk(2, dim=1).values.sum(dim=1)
    '''))
    (source / "setup.cfg").write_text(textwrap.dedent("""
        [metadata]
        name = oodbench-topk
        version = 0.1

        [options]
        packages = oodbench_topk

        [options.entry_points]
        oodbench.postprocessors =
            topk_mass = oodbench_topk:TopKMass
    """))
    (source / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def test_entry_point_plugin_is_listed_and_ranked(run_cli, tmp_path, installed_plugin_package):
    env = {"PYTHONPATH": f"{installed_plugin_package}:{REPO}"}
    listing = run_cli("list", "postprocessors", "--wide", env=env)  # each row on one line
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if l.startswith("topk_mass"))
    assert "entry point oodbench-topk" in line
    table = listing.stdout.split("\n\n")[0].splitlines()[2:]  # below the header and its rule
    shown = [row.split()[0] for row in table if row.strip()]
    assert shown == sorted(shown) and {"ensemble", "mc_dropout", "topk_mass"} <= set(shown)  # by the name shown
    run = run_cli("run", digits_config(tmp_path, postprocessors=["topk_mass", "msp"]), env=env)
    assert run.returncode == 0, run.stderr
    assert [r["postprocessor"] for r in compact_rows(run.stdout)].count("topk_mass") == 1


@pytest.mark.parametrize("args,expected", [
    (["run", "missing.yaml"], "config file not found"),
    (["leaderboard", "--results", "nowhere.sqlite"], "results store not found"),
])
def test_clear_errors(run_cli, args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unknown_postprocessor_suggests_close_names(run_cli, tmp_path):
    result = run_cli("run", digits_config(tmp_path, postprocessors=["msq"]))
    assert result.returncode == 2
    assert "unknown postprocessor 'msq'" in result.stderr and "did you mean: msp" in result.stderr
    assert not (tmp_path / "results.sqlite").exists()


def test_misspelled_config_key_suggests_the_right_one(run_cli, tmp_path):
    config = digits_config(tmp_path)
    config.write_text(config.read_text().replace("postprocessors:", "postprocesors:"))
    result = run_cli("validate", config)
    assert result.returncode == 2
    assert "unknown key 'postprocesors'" in result.stderr and "did you mean: postprocessors" in result.stderr


def test_validate_and_a_data_root_that_does_not_exist(run_cli, tmp_path):
    """A data root that is not there: an error (exit 2, before any checkpoint) when the ID test
    split reads files from it, as `run` would stop; a note naming the splits when only OOD
    sets do (run marks them missing); nothing when the built-in offline sets read none."""
    import yaml

    missing = tmp_path / "no-such-root"
    benchmark = {"name": "folders", "version": 1, "image": {"size": 8, "channels": 1}, "num_classes": 10,
                 "id": {"val": {"dataset": "sklearn_digits"}, "test": {"dataset": "sklearn_digits"}},
                 "near": {"noise": {"dataset": "gaussian_noise"}},
                 "far": {"pictures": {"dataset": "image_folder", "options": {"path": "pictures"}}}}
    (tmp_path / "folders.yaml").write_text(yaml.safe_dump(benchmark))
    where = f"data root {missing} does not exist (set by --data-root, OODBENCH_DATA or the config's data_root)"
    result = run_cli("validate", digits_config(tmp_path, benchmark=str(tmp_path / "folders.yaml"), fit_split="val",
                                               data_root=str(missing)))
    assert result.returncode == 0 and result.stdout.startswith("ok: folders v1")
    assert result.stderr.strip() == f"note: {where}; the splits far:pictures read their files from it"
    digits = run_cli("validate", digits_config(tmp_path, data_root=str(missing)))
    assert digits.returncode == 0 and digits.stderr.strip() == ""
    cifar = digits_config(tmp_path, benchmark="cifar10", data_root=str(missing))
    fatal = run_cli("validate", cifar)
    assert fatal.returncode == 2 and fatal.stderr.startswith(f"oodbench: error: {where}; the splits id:")
    assert "id:test, " in fatal.stderr and "far:textures" in fatal.stderr
    # with checkpoints missing too: the data root on its own line first, the checkpoints' error last
    both = run_cli("validate", REPO / "configs" / "experiments" / "cifar10.yaml", "--data-root", str(missing))
    lines = both.stderr.strip().splitlines()
    assert both.returncode == 2 and lines[0].startswith(f"{where}; the splits id:") and "checkpoint" in lines[-1]


def test_a_limit_run_is_read_by_every_command_with_the_same_limit(run_cli, tmp_path, digits_models):
    """After `run --limit`, plot, report, calibration and compare read that run with the same
    --limit; without it they say which --limit the store holds."""
    config = digits_config(tmp_path, models=[{"name": "digits-cnn", "tags": ["standard"]},
                                             {"name": "digits-cnn-robust", "tags": ["robust"]}])
    assert run_cli("run", config, "--limit", "60").returncode == 0
    tables = tmp_path / "tables" / "digits-limit60" / "leaderboard.csv"
    whole = pd.read_csv(tables)
    # a run of part of the config keeps the tables whole: every stored cell of the config, as before
    part = run_cli("run", config, "--limit", "60", "--postprocessors", "msp", "--models", "digits-cnn")
    assert part.returncode == 0 and "ebo" not in part.stdout
    pd.testing.assert_frame_equal(pd.read_csv(tables), whole)
    out = str(tmp_path / "figures")
    commands = [("plot", "hist", config, "--postprocessor", "ebo", "--output", out),
                ("report", config, "--operating-point", "--postprocessor", "ebo"),
                ("calibration", config, "--levels", "2", "--output", out),
                ("compare", config, "--output", out)]
    for command in commands:
        done = run_cli(*command, "--limit", "60")
        assert done.returncode == 0, (command, done.stderr[-1500:])
        if command[0] == "compare":  # the sampled rows (no whole run yet), and it says so
            assert "ID test 60 of 216" in " ".join(done.stdout.split())
        if command[0] not in ("plot", "report"):
            continue  # calibration reads the output cache alone, where other tests' whole runs may be
        unlimited = run_cli(*command)
        assert unlimited.returncode == 2 and "add --limit 60 to read the --limit 60 run it holds" in unlimited.stderr, \
            (command, unlimited.stderr[-1500:])
    # the sampled run's figures are named apart from a whole run's (which the HTML page embeds)
    assert {p.name for p in Path(out).glob("*.png")} == {"hist_digits-limit60_ebo.png", "calibration_digits-limit60.png",
                                                         "compare_digits-limit60.png"}
    other = run_cli(*commands[0], "--limit", "30")
    assert other.returncode == 2 and "run `oodbench run" in other.stderr and "--limit 30` first" in other.stderr
    # Beside a whole run, compare --limit 60 still reads the sampled run; without --limit, the whole one.
    assert run_cli("run", config).returncode == 0
    sampled, whole = run_cli(*commands[3], "--limit", "60"), run_cli(*commands[3])
    assert sampled.returncode == 0 and whole.returncode == 0, (sampled.stderr[-1500:], whole.stderr[-1500:])
    assert "ID test 60 of 216" in " ".join(sampled.stdout.split())
    assert "ID test 60 of 216" not in " ".join(whole.stdout.split())
    assert sampled.stdout.split("\n\n")[0] != whole.stdout.split("\n\n")[0]
    missing = run_cli(*commands[3], "--limit", "30")  # no --limit 30 run: not the whole one shown as if sampled
    assert missing.returncode == 2 and "--limit 30` first" in missing.stderr, missing.stderr[-1500:]
    # a run of another sample says so, rather than that the data changed
    smaller = run_cli("run", config, "--limit", "40", "--postprocessors", "msp", "--models", "digits-cnn")
    assert smaller.returncode == 0 and "changed since the last run" not in smaller.stderr  # another sample, said so
    assert "id:test: this run reads 40 of its " in smaller.stderr and "the stored ones stay" in smaller.stderr


HEAVY = ("torch", "numpy", "pandas", "matplotlib", "sklearn", "scipy")


def test_the_cli_is_thin_modules_and_builds_its_parser_without_heavy_imports():
    """One module per command group (issue 27): none over 300 lines; `python -m oodbench.cli`
    works; building the parser (every command's options) imports none of the heavy libraries,
    which each handler imports when it runs; every command's --help exits 0."""
    folder = REPO / "oodbench" / "cli"
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert len(sizes) > 5 and max(sizes.values()) <= 300, sizes
    probe = ("import sys, oodbench.cli; parser = oodbench.cli.build_parser(); "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
             "print(' '.join(parser._subparsers._group_actions[0].choices))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    heavy, commands = done.stdout.splitlines()
    assert heavy == "[]"
    assert commands.split() == ["run", "leaderboard", "reproduce", "results", "list", "validate", "data", "compare",
                                "calibration", "report", "failure", "plot", "attack"]
    usage = subprocess.run([sys.executable, "-m", "oodbench.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 0 and "leaderboard" in usage.stdout, usage.stderr
    from oodbench.cli import main

    for command in [*commands.split(), "data status", "data fetch"]:
        with pytest.raises(SystemExit) as stop:
            main([*command.split(), "--help"])
        assert stop.value.code == 0, command
