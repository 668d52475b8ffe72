"""The HTML leaderboard page (`oodbench leaderboard --format html`): its cells against the
store's numbers, computed here from the stored results rows; the caption, intervals, seeds,
failed cells, the published columns, the comparison and the embedded figures; and the page
in a real browser: headless Chromium (Debian's package, installed here when missing and
running as root) runs the sort script, the DOM it leaves is read back and checked, and a
screenshot is taken."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.image import imread

from oodbench.benchmark.runner import run_experiment
from oodbench.cli import main
from oodbench.metrics.detection import ood_metrics
from oodbench.report.html import leaderboard_page, saved_figures, shown_runs
from oodbench.report.ledger import COLUMNS as LEDGER_COLUMNS
from oodbench.storage.store import Cell, ResultStore
from oodbench.benchmark.leaderboard import leaderboard_frames
from tests.conftest import digits_config

FAILED_REASON = "out of memory on the test machine (a cell written failed by this test)"
NEAR, FAR = ["digits_6_9"], ["textures", "gaussian", "uniform"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Tables(HTMLParser):
    """Every <table> of a page: id -> {"keys": header data-keys, "rows": [[(text, attributes)]]},
    and the attributes of its headers (``aria-sort`` after the script sorted); the <img> sources."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.images, self.headers = {}, [], {}
        self.table = self.cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), {"keys": [], "rows": []})
            self.headers[attrs.get("id")] = []
        elif tag == "th" and self.table is not None:
            self.table["keys"].append(attrs["data-key"])
            self.headers[next(reversed(self.headers))].append(attrs)
        elif tag == "tr" and self.table is not None:
            self.table["rows"].append([])
        elif tag == "td":
            self.cell = ["", attrs]
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.table["rows"][-1].append((self.cell[0].strip(), self.cell[1]))
            self.cell = None
        elif tag == "table":
            self.table["rows"] = [row for row in self.table["rows"] if row]
            self.table = None


def records(table: dict) -> list[dict]:
    """The rows of a parsed table as {column key: (text, attributes)}."""
    return [dict(zip(table["keys"], row)) for row in table["rows"]]


def expected_values(path) -> dict[tuple[str, str], dict[str, float]]:
    """(model, postprocessor) -> {column key: value}, from the store's results rows: each set's
    AUROC and FPR@95 (ID positive), the near/far averages and their unweighted mean over all sets."""
    results = ResultStore(path, readonly=True).frame("results")
    expected = {}
    for (model, postprocessor), group in results.groupby(["model", "postprocessor"]):
        value = {(d, m): v for d, m, v in zip(group.dataset, group.metric, group.value)}
        row = {"acc": value[("id_test", "acc")]}
        for metric, stored in (("auroc", "auroc"), ("fpr", "fpr95")):
            for dataset in NEAR + FAR:
                row[f"{dataset}|{metric}"] = value[(dataset, stored)]
            for name, sets in (("near-OOD", NEAR), ("far-OOD", FAR), ("average", NEAR + FAR)):
                row[f"{name}|{metric}"] = float(np.mean([value[(d, stored)] for d in sets]))
        expected[(model, postprocessor)] = row
    return expected


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, session_cache):
    """A sampled digits run (a standard and a robust model, three methods) and one failed cell."""
    folder = tmp_path_factory.mktemp("html")
    config = digits_config(folder, postprocessors=["msp", "ebo", "knn"], limit=200, models=[
        {"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn-robust", "tags": ["robust"]}])
    run_experiment(config, cache_dir=str(session_cache), quiet=True)
    path = folder / "results.sqlite"
    store = ResultStore(path)
    data = store.frame("cells").data_fingerprint.iloc[0]
    store.write_cell(Cell("digits", "digits-cnn", "odin", "default", fingerprint="odin-failed", data_fingerprint=data,
                          status="failed", reason=FAILED_REASON, tags=["standard"]))
    store.close()
    return path


def page_of(path, **options) -> str:
    store = ResultStore(path, readonly=True)
    return leaderboard_page(leaderboard_frames(store, "digits"), store, **options)


@pytest.fixture(scope="module")
def digits_page(digits_store) -> str:
    """The page of `digits_store` with no options (built once: drawing its figures takes seconds)."""
    return page_of(digits_store)


def check_cells(rows: list[dict], path) -> None:
    """Every number of the leaderboard's rows is the store's, x100 with 2 decimals; the failed row
    shows its status in every metric cell and its reason on hover."""
    expected = expected_values(path)
    assert {(r["model"][0], r["postprocessor"][0]) for r in rows} == {*expected, ("digits-cnn", "odin")}
    for row in rows:
        key = (row["model"][0], row["postprocessor"][0])
        if key[1] == "odin":
            metric_cells = [row[k] for k in row if "|" in k]
            assert metric_cells and all(text == "FAILED" and attrs["title"] == FAILED_REASON
                                        for text, attrs in metric_cells)
            assert row["status"][0] == "failed"
            continue
        assert row["status"][0] == "done"
        for column, value in expected[key].items():
            text, attrs = row[column]
            assert text.rstrip("~") == f"{100 * value:.2f}", (key, column)
            assert float(attrs["data-sort"]) == pytest.approx(value, abs=1e-12), (key, column)


def test_the_page_holds_the_stores_numbers_caption_notes_and_comparison(digits_store, digits_page):
    page = digits_page
    tables = Tables(page)
    check_cells(records(tables.tables["leaderboard-0"]), digits_store)
    for phrase in ("FPR@95 with ID as positive", "near-OOD (digits_6_9)", "Sampled: ID test 200 of",
                   "Conventions: paper", "Best per column in bold", f"digits-cnn / odin: failed: {FAILED_REASON}"):
        assert phrase in page.replace("&#39;", "'"), phrase
    # the robust-vs-standard gain is the robust model's near-OOD AUROC minus the standard one's
    expected = expected_values(digits_store)
    gains = {(r["postprocessor"][0], r["group"][0]): r for r in records(tables.tables["compare-0-0"])}
    for postprocessor in ("msp", "ebo", "knn"):
        robust, standard = (expected[(m, postprocessor)]["near-OOD|auroc"] for m in ("digits-cnn-robust", "digits-cnn"))
        gain = gains[(postprocessor, "near")]["robust vs standard (gain)"]
        assert gain[0] == f"{100 * (robust - standard):+.2f}"
        assert gains[(postprocessor, "near")]["digits-cnn-robust"][0] == f"{100 * robust:.2f}"


def test_the_page_is_one_file_with_its_figures_embedded(digits_page):
    page = digits_page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "src=\"http" not in page
    images = Tables(page).images
    assert len(images) == 2  # the tradeoff and the robust-vs-standard bars, drawn from the rows
    for source in images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_intervals_and_the_published_columns(digits_store, tmp_path):
    ledger = tmp_path / "mine.csv"
    ledger.write_text(",".join(LEDGER_COLUMNS) + "\n" + "digits,msp,MSP,CrossEntropy,CNN,10 epochs,no,near_auroc,"
                      "90.00,0.50,,paper,https://example.org/digits.csv,leaderboard,2025-07-19\n")
    page = page_of(digits_store, resamples=50, reference=str(ledger))
    assert "95% bootstrap intervals: 50 resamples" in page and "Published reference mine" in page
    rows = {(r["model"][0], r["postprocessor"][0]): r for r in records(Tables(page).tables["leaderboard-0"])}
    expected = expected_values(digits_store)
    text, attrs = rows[("digits-cnn", "msp")]["near-OOD|auroc"]
    value = expected[("digits-cnn", "msp")]["near-OOD|auroc"]
    low, high = map(float, text.rstrip("~").split("[")[1].rstrip("]").split(","))
    assert text.startswith(f"{100 * value:.2f} [") and low <= 100 * value <= high
    assert float(attrs["data-sort"]) == pytest.approx(value)
    published = rows[("digits-cnn", "msp")]
    assert published["published-0"][0] == "90.00±0.50"
    assert published["published-1"][0].startswith(f"{100 * value - 90:+.2f}")
    assert rows[("digits-cnn", "knn")]["published-0"][0] == "-"


def test_seeds_averaged_through_the_cli(tmp_path, capsys):
    """Two seeds of a toy benchmark written straight to a store: the page of the family shows each
    row's mean ± std over the seeds, with the seeds counted; --output writes it there."""
    rng = np.random.default_rng(0)
    store, values = ResultStore(tmp_path / "seeds.sqlite"), []
    for seed in (1, 2):
        benchmark = f"toy_seed{seed}"
        store.write_datasets(benchmark, "net", [{"dataset": "near1", "group": "near", "status": "present",
                                                 "samples": 80}], f"data{seed}")
        ood, scores = rng.normal(0, 1, 80), rng.normal(1 + seed, 1, 90)
        metrics = {"near1": ood_metrics(scores, ood), "id_test": {"acc": 0.9}}
        values.append(metrics["near1"]["auroc"])
        store.write_cell(Cell(benchmark, "net", "msp", "default", fingerprint=f"cell{seed}",
                              data_fingerprint=f"data{seed}", metrics=metrics,
                              groups={"near1": "near", "id_test": "id"}))
    store.close()
    output = tmp_path / "page.html"
    code = main(["leaderboard", "--results", str(tmp_path / "seeds.sqlite"), "--benchmark", "toy", "--format", "html",
                 "--output", str(output)])
    assert code == 0 and capsys.readouterr().out.strip() == f"report page: {output}"
    row = records(Tables(output.read_text()).tables["leaderboard-0"])[0]
    assert row["n"][0] == "2" and "Mean ± standard deviation over seeds 1, 2" in output.read_text()
    assert row["near1|auroc"][0] == f"{100 * np.mean(values):.2f}±{100 * np.std(values, ddof=1):.2f}"


def test_the_cli_writes_beside_the_store_and_says_why_not(digits_store, tmp_path, capsys):
    store = tmp_path / "copy.sqlite"
    shutil.copy(digits_store, store)
    assert main(["leaderboard", "--results", str(store), "--format", "html"]) == 0
    written = tmp_path / "tables" / "digits" / "leaderboard.html"
    assert capsys.readouterr().out.strip() == f"report page: {written}" and written.stat().st_size > 0
    assert main(["leaderboard", "--results", str(store), "--format", "html", "--output",
                 str(tmp_path / "absent" / "page.html")]) == 2
    assert "its folder" in capsys.readouterr().err and not (tmp_path / "absent").exists()
    assert main(["leaderboard", "--results", str(store), "--format", "html", "--attack"]) == 2
    assert "--attack has no html page" in capsys.readouterr().err


def test_saved_figures_of_the_benchmark_come_in_and_no_others(tmp_path):
    for stem in ("hist_digits_msp", "calibration_digits", "hist_digits_seed1_msp", "tradeoff_digits", "notes_x",
                 "failure_digits-limit300", "hist_digits-limit300_ebo", "failure_digits-limit30"):
        (tmp_path / f"{stem}.png").write_bytes(PNG_SIGNATURE + stem.encode())
    found = saved_figures(tmp_path, "digits", ["digits", "digits_seed1"], skip={"tradeoff"})
    assert [f["title"].split(" ")[0] for f in found] == ["calibration_digits.png", "hist_digits_msp.png"]
    assert base64.b64decode(found[1]["png"]) == PNG_SIGNATURE + b"hist_digits_msp"
    # the rows of a --limit 300 run: that run's figures, not the whole run's nor another limit's
    sampled = saved_figures(tmp_path, "digits", ["digits", "digits_seed1"], skip={"tradeoff"}, runs=["digits-limit300"])
    assert [f["title"].split(" ")[0] for f in sampled] == ["failure_digits-limit300.png", "hist_digits-limit300_ebo.png"]


def test_the_page_of_a_sampled_run_shows_that_runs_figures(digits_store, tmp_path):
    """The digits store holds a --limit run only: its page names that run and shows the
    figures saved under its name beside the store."""
    store = ResultStore(digits_store, readonly=True)
    (frame,) = leaderboard_frames(store, "digits")
    assert shown_runs(frame, store) == ["digits-limit200"]
    plots = tmp_path / "plots"
    plots.mkdir()
    for stem in ("failure_digits-limit200", "failure_digits"):
        (plots / f"{stem}.png").write_bytes(PNG_SIGNATURE + stem.encode())
    found = saved_figures(plots, "digits", ["digits"], skip=set(), runs=shown_runs(frame, store))
    assert [base64.b64decode(f["png"]) for f in found] == [PNG_SIGNATURE + b"failure_digits-limit200"]


# --------------------------------------------------------------------------- in a real browser


def find_chromium() -> str:
    """Chromium's command; as root on a machine without it, Debian's package is installed first
    (the browser test is part of the suite, so a missing browser fails rather than skips)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("the HTML page test needs Chromium: install Debian's package (sudo apt-get install -y chromium) "
                    "or run the tests as root, which installs it")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=environment, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=environment, check=True, capture_output=True)
        result = subprocess.run(install, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, f"apt-get install chromium failed: {result.stderr[-2000:]}"
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium():
    return find_chromium()


def browse(chromium: str, profile, *arguments: str) -> subprocess.CompletedProcess:
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_in_chromium_the_sorted_dom_holds_the_stores_numbers_and_a_screenshot_shows_it(digits_store, digits_page,
                                                                                       chromium, tmp_path):
    page = tmp_path / "leaderboard.html"
    page.write_text(digits_page, encoding="utf-8")
    fragment = urllib.parse.quote("sort=leaderboard-0:near-OOD|auroc:asc", safe="=")
    result = browse(chromium, tmp_path / "profile", "--dump-dom", f"{page.as_uri()}#{fragment}")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Tables(result.stdout)
    rows = records(dom.tables["leaderboard-0"])
    check_cells(rows, digits_store)
    # the script sorted on load: near-OOD AUROC ascending, the failed row (no value) last
    near = [float(r["near-OOD|auroc"][1]["data-sort"]) for r in rows[:-1]]
    assert near == sorted(near) and len(set(near)) > 1 and rows[-1]["postprocessor"][0] == "odin"
    sorted_by = [h for h in dom.headers["leaderboard-0"] if "aria-sort" in h]
    assert [(h["data-key"], h["aria-sort"]) for h in sorted_by] == [("near-OOD|auroc", "ascending")]
    # the row labels stick to the left edge when the table scrolls: model at 0, the method beside it
    labels = [h["data-key"] for h in dom.headers["leaderboard-0"] if "label" in h.get("class", "")]
    assert labels == ["model", "postprocessor"]
    offsets = {(r["model"][1]["style"], r["postprocessor"][1]["style"]) for r in rows}
    assert len(offsets) == 1
    model_left, method_left = (float(style.removeprefix("left: ").removesuffix("px;")) for style in offsets.pop())
    assert model_left == 0 < method_left and all("label" not in r["status"][1].get("class", "") for r in rows)

    shot = tmp_path / "page.png"
    result = browse(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,900",
                    "--hide-scrollbars", page.as_uri())
    assert result.returncode == 0 and shot.read_bytes().startswith(PNG_SIGNATURE), result.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (900, 1400)
    colours = len(np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0))
    assert colours > 20 and pixels.std() > 0.05  # text, rules and header shading, not a blank page
