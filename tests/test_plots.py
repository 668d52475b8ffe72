"""`oodbench plot KIND` and the figures of `compare` and `calibration`: each figure is
paper-sized, written as PNG and PDF, and read back from matplotlib: its series hold the
data, every axis is labelled with units, the legend names every set, and no two sets
share a colour."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.markers import MarkerStyle

import oodbench
from oodbench.cli import main
from oodbench.errors import OodbenchError
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.postprocessors.base import FAMILIES, Postprocessor
from oodbench.registry import POSTPROCESSORS
from oodbench.report import plots
from oodbench.report.plots.images import subsample_images
from oodbench.storage.store import ResultStore
from oodbench.benchmark.leaderboard import leaderboard_frame
from tests.conftest import digits_config

OOD_SETS = ["digits_6_9 (near)", "textures (far)", "gaussian (far)", "uniform (far)"]
CLASSES = 6
POSTPROCESSORS_RUN = ["msp", "temp_scaling", "ebo", "mds", "react", "odin"]  # five families
BUILTIN_FAMILIES = {
    "softmax": {"msp", "temp_scaling", "entropy", "gen", "klm"},
    "logit": {"mls", "ebo"},
    "feature": {"mds", "rmds", "knn", "vim"},
    "activation": {"react", "ash", "scale", "dice"},
    "gradient": {"odin", "pro_msp", "pro_ent", "pro_msp_t", "pro_gen", "sni", "gradnorm"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, session_cache):
    path = digits_config(tmp_path_factory.mktemp("plots"), postprocessors=POSTPROCESSORS_RUN, models=[
        {"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn", "label": "copy", "tags": ["robust"]}])
    oodbench.run(path, cache_dir=str(session_cache), quiet=True)
    return path, session_cache


@pytest.fixture(scope="module")
def experiment(run):
    return CachedExperiment.open(run[0], cache_dir=str(run[1]))


def plot(run, tmp_path, monkeypatch, *args):
    """Run `oodbench plot ...` in process; return the figure it saved and the files written."""
    saved = []
    original = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, stem: saved.append(fig) or original(fig, out, stem))
    path, cache = run
    assert main(["plot", args[0], str(path), "--cache-dir", str(cache), "--output", str(tmp_path), *args[1:]]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 1 and len(files) == 2 and {f.rsplit(".", 1)[1] for f in files} == {"png", "pdf"}
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
    assert_paper_sized(saved[0], tmp_path / next(f for f in files if f.endswith(".png")))
    return saved[0], files


def assert_paper_sized(figure, png=None) -> None:
    """Single- or double-column wide, text of at least 7 pt; the PNG is that size at `plots.DPI`."""
    width, height = figure.get_size_inches()
    assert width in (plots.SINGLE_COLUMN, plots.DOUBLE_COLUMN) and height <= 9
    if png is not None:
        assert mpl.image.imread(png).shape[:2] == (round(height * plots.DPI), round(width * plots.DPI))
    FigureCanvasAgg(figure).draw()
    texts = [t for t in figure.findobj(mpl.text.Text) if t.get_text().strip() and t.get_visible()]
    assert texts and min(t.get_fontsize() for t in texts) >= 7


def hexes(colours) -> list[str]:
    return [to_hex(c, keep_alpha=False) for c in colours]


def assert_distinct(colours) -> None:
    shown = hexes(colours)
    assert len(set(shown)) == len(shown), shown


def legend_texts(figure) -> list[str]:
    (legend,) = figure.legends
    return [t.get_text() for t in legend.get_texts()]


def marker_of(collection) -> str:
    """The marker symbol a scatter collection draws (matched on its path)."""
    vertices = collection.get_paths()[0].vertices
    for symbol in ("o", *plots.OOD_MARKERS):
        style = MarkerStyle(symbol)
        candidate = style.get_path().transformed(style.get_transform()).vertices
        if candidate.shape == vertices.shape and np.allclose(candidate, vertices):
            return symbol
    raise AssertionError("unknown marker")


def step_histogram(patch) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, densities) of a step histogram patch."""
    xy = patch.get_xy()
    return xy[0::2, 0], xy[1:-1:2, 1]


def assert_histograms_hold(figure, data: dict[str, dict[str, np.ndarray]], xlabel: str) -> None:
    """One panel per model, one step histogram per set holding its data, counts in the labels."""
    assert [ax.get_title() for ax in figure.axes] == list(data)
    for ax, splits in zip(figure.axes, data.values()):
        labels = [f"{name} (n={len(values):,})" for name, values in splits.items()]
        assert [patch.get_label() for patch in ax.patches] == labels
        for patch, values in zip(ax.patches, splits.values()):
            edges, densities = step_histogram(patch)
            np.testing.assert_allclose(densities, np.histogram(values, bins=edges, density=True)[0])
        assert_distinct([patch.get_edgecolor() for patch in ax.patches])
        assert hexes([ax.patches[0].get_edgecolor()]) == ["#000000"]  # ID test in black
        assert ax.get_xlabel() == xlabel and ax.get_ylabel() == "density (area = 1)"
    assert legend_texts(figure) == [p.get_label() for p in figure.axes[0].patches]


def test_hist(run, experiment, tmp_path, monkeypatch):
    figure, files = plot(run, tmp_path, monkeypatch, "hist", "--postprocessor", "temp_scaling")
    assert files == ["hist_digits_temp_scaling.pdf", "hist_digits_temp_scaling.png"]
    data = plots.score_data(experiment, "temp_scaling")
    assert list(data) == ["digits-cnn", "copy"]
    assert all(list(splits) == ["ID test", *OOD_SETS] for splits in data.values())
    assert len(data["copy"]["ID test"]) == len(experiment.outputs(experiment.config.models[0], "id:test"))
    assert_histograms_hold(figure, data, "temp_scaling score (higher = ID)")


def test_pro_shift(run, experiment, tmp_path, monkeypatch):
    figure, files = plot(run, tmp_path, monkeypatch, "pro-shift", "--samples", "40", "--eps", "0.01")
    assert files == ["pro-shift_digits.pdf", "pro-shift_digits.png"]
    data = plots.pro_shift_data(experiment, eps=0.01, samples=40, seed=0)
    assert_histograms_hold(figure, data, "MSP change s1 - s0 (probability)")
    assert figure.axes[0].patches[0].get_label() == "ID test (n=40)"
    assert "at most 40 images per set" in " ".join(figure.get_suptitle().split())


def test_pro_shift_labels_the_real_count_of_a_small_set(run, experiment, tmp_path, monkeypatch):
    size = len(experiment.outputs(experiment.config.models[0], "id:test"))
    figure, _ = plot(run, tmp_path, monkeypatch, "pro-shift", "--samples", str(size + 100))
    assert figure.axes[0].patches[0].get_label() == f"ID test (n={size:,})"


def test_pro_shift_is_one_pro_step_of_msp(run):
    experiment = CachedExperiment.open(run[0], cache_dir=str(run[1]))
    data = plots.pro_shift_data(experiment, eps=0.01, samples=30, seed=0)
    model = experiment.model(experiment.config.models[0])
    images = subsample_images(experiment, experiment.config.models[0], "id:test", 30, 0).requires_grad_(True)
    msp = torch.softmax(model(images), dim=1).max(dim=1).values
    (grad,) = torch.autograd.grad(msp.sum(), images)
    with torch.no_grad():
        stepped = torch.softmax(model(images - 0.01 * grad.sign()), dim=1).max(dim=1).values
    np.testing.assert_allclose(data["digits-cnn"]["ID test"], (stepped - msp).detach().numpy(), atol=1e-6)


def test_landscape(run, experiment, tmp_path, monkeypatch):
    figure, files = plot(run, tmp_path, monkeypatch, "landscape", "--steps", "9", "--index", "3", "--radius", "0.5")
    assert files == ["landscape_digits_msp.pdf", "landscape_digits_msp.png"]
    data = plots.landscape_data(experiment, "msp", index=3, radius=0.5, steps=9)
    images = ["ID test #3", *(f"{name} #3" for name in OOD_SETS)]
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 2 * (1 + len(OOD_SETS))  # models x (ID image + one image per OOD set)
    assert [ax.get_label() for ax in panels] == [f"{m} | {i}" for m in ("digits-cnn", "copy") for i in images]
    assert [ax.get_title().replace("\n", " ") for ax in panels[:len(images)]] == images
    assert [panels[i].get_ylabel() for i in (0, len(images))] == ["digits-cnn\nb (along d2)", "copy\nb (along d2)"]
    for ax in panels:
        model, image = ax.get_label().split(" | ")
        np.testing.assert_array_equal(ax.images[0].get_array(), data[model][image])
        assert ax.images[0].get_extent() == [-0.5, 0.5, -0.5, 0.5]
    values = np.concatenate([s.ravel() for surfaces in data.values() for s in surfaces.values()])
    assert {ax.images[0].get_clim() for ax in panels} == {(values.min(), values.max())}  # one colour scale
    (colorbar,) = [ax for ax in figure.axes if not ax.images]
    assert colorbar.get_ylabel().startswith("msp score")
    assert colorbar.yaxis.get_offset_text().get_text() == ""
    assert "[0,1]-pixel units" in figure.get_supxlabel()


def test_landscape_colour_bar_reads_without_offset_near_one():
    surfaces = {"m": {"ID": 1 - np.linspace(1e-5, 1e-4, 16).reshape(4, 4), "OOD": np.full((4, 4), 0.99995)}}
    figure = plots.landscape_figure(surfaces, 1.0, "msp score", "t")
    FigureCanvasAgg(figure).draw()
    colorbar = figure.axes[-1]
    ticks = [t.get_text().replace("\u2212", "-") for t in colorbar.get_yticklabels() if t.get_text()]
    assert colorbar.yaxis.get_offset_text().get_text() == ""
    assert len(ticks) >= 3 and all(0.9999 <= float(t) <= 1 for t in ticks)


def test_landscape_center_is_the_clean_score(run):
    experiment = CachedExperiment.open(run[0], cache_dir=str(run[1]))
    data = plots.landscape_data(experiment, "msp", index=2, radius=0.5, steps=5)
    clean = torch.softmax(experiment.outputs(experiment.config.models[0], "id:test").logits[2], dim=0).max()
    assert data["digits-cnn"]["ID test #2"][2, 2] == pytest.approx(clean.item(), abs=1e-5)


def assert_feature_styles(figure, classes: int, ood: int) -> None:
    """Classes as dots from one palette; each OOD set its own marker and a colour no class has."""
    for ax in (ax for ax in figure.axes if ax.get_label() != "<colorbar>"):
        collections = ax.collections
        assert_distinct([c.get_facecolor()[0] for c in collections])
        assert {marker_of(c) for c in collections[:classes]} == {"o"}
        markers = [marker_of(c) for c in collections[classes:]]
        assert len(markers) == ood and len(set(markers)) == ood and "o" not in markers


def test_features(run, experiment, tmp_path, monkeypatch):
    for projection in ("pca", "lda"):
        figure, files = plot(run, tmp_path / projection, monkeypatch, "features", "--projection", projection,
                             "--samples", "60")
        assert files == [f"features_digits_{projection}.pdf", f"features_digits_{projection}.png"]
        points, axis_labels = plots.feature_data(experiment, projection, samples=60)
        labels = [f"class {c}" for c in range(CLASSES)] + OOD_SETS
        for ax, (model, series) in zip(figure.axes, points.items()):
            assert ax.get_title() == model
            assert [c.get_label() for c in ax.collections] == labels == list(series)
            for collection, xy in zip(ax.collections, series.values()):
                np.testing.assert_allclose(collection.get_offsets(), xy)
            assert (ax.get_xlabel(), ax.get_ylabel()) == axis_labels[model]
        assert_feature_styles(figure, CLASSES, len(OOD_SETS))
        assert legend_texts(figure) == labels
    assert axis_labels["digits-cnn"][0] == "LD 1 (whitened discriminant units)"
    points, axis_labels = plots.feature_data(experiment, "pca", samples=60)
    assert axis_labels["copy"][1].startswith("PC 2, ") and axis_labels["copy"][1].endswith("of variance (feature units)")


@pytest.mark.parametrize("classes", [10, 12, 30])
def test_features_palette_does_not_run_out(classes):
    rng = np.random.default_rng(0)
    series = {f"class {c}": rng.normal(size=(5, 2)) for c in range(classes)}
    series.update({f"ood{i} (far)": rng.normal(size=(5, 2)) for i in range(9)})  # past the fixed OOD colours
    figure = plots.scatter_figure({"m": series}, "t", {"m": ("x (u)", "y (u)")})
    assert_paper_sized(figure)
    assert_feature_styles(figure, classes, 9)
    class_colours = set(hexes(c.get_facecolor()[0] for c in figure.axes[0].collections[:classes]))
    assert not class_colours & set(hexes(c.get_facecolor()[0] for c in figure.axes[0].collections[classes:]))
    if classes <= plots.MAX_CLASS_LEGEND:
        assert legend_texts(figure) == list(series)
    else:  # one legend entry and a colour bar for the classes
        assert legend_texts(figure) == [f"ID test ({classes} classes, colour bar)", *list(series)[classes:]]
        assert figure.axes[-1].get_ylabel() == "ID test class (index)"


def calibration_frame() -> pd.DataFrame:
    levels = np.linspace(0, 2, 4)
    return pd.concat([pd.DataFrame({"model": model, "level": levels, "acc": 0.9 - 0.1 * levels - shift,
                                    "ece": 0.02 + 0.1 * levels, "nll": 0.3 + levels + shift,
                                    "auroc_near": 0.8 - 0.1 * levels, "auroc_far": 0.9 - 0.05 * levels - shift})
                      for model, shift in (("std", 0.0), ("rob", 0.05), ("third", 0.1))], ignore_index=True)


def test_calibration_figure_is_a_2x2_grid_in_the_table_units():
    frame = calibration_frame()
    figure = plots.calibration_figure(frame)
    assert_paper_sized(figure)
    assert len(figure.axes) == 4
    assert [ax.get_ylabel() for ax in figure.axes] == ["accuracy on ID test (x100)", "ECE, 15 bins (x100)",
                                                       "NLL on ID test (nats)", "MSP AUROC, ID vs OOD (x100)"]
    assert [ax.get_xlabel() for ax in figure.axes[2:]] == ["logit noise s (x std of the logits)"] * 2
    models = ["std", "rob", "third"]
    for ax, column, scale in zip(figure.axes[:3], ("acc", "ece", "nll"), (100, 100, 1)):
        assert [line.get_label() for line in ax.get_lines()] == models
        for line, model in zip(ax.get_lines(), models):
            rows = frame[frame.model == model]
            np.testing.assert_allclose(line.get_xdata(), rows.level)
            np.testing.assert_allclose(line.get_ydata(), scale * rows[column])
        assert_distinct([line.get_color() for line in ax.get_lines()])
    auroc = figure.axes[3].get_lines()
    assert [line.get_label() for line in auroc] == [f"{m}, {g}-OOD" for m in models for g in ("near", "far")]
    np.testing.assert_allclose(auroc[3].get_ydata(), 100 * frame[frame.model == "rob"].auroc_far)
    assert len({(to_hex(line.get_color()), line.get_linestyle()) for line in auroc}) == 6
    assert legend_texts(figure) == models + ["near-OOD (AUROC panel)", "far-OOD (AUROC panel)"]


def test_compare_bars_start_at_zero():
    rows = [{"model": m, "tag": t, "postprocessor": p, "group": g, "metric": metric, "value": v}
            for m, t in (("std", "standard"), ("rob", "robust"), ("rob2", "robust"))
            for p, v in (("msp", 0.9), ("ebo", 0.94)) for g in ("near", "far") for metric in ("auroc", "fpr")]
    long = pd.DataFrame(rows)
    long.attrs.update(benchmark="b", postprocessors=["msp", "ebo"])
    figure = plots.auroc_bars(long)
    assert_paper_sized(figure)
    for ax, group in zip(figure.axes, ("near", "far")):
        assert ax.get_ylim() == (0, 100)
        assert ax.get_ylabel() == f"{group}-OOD AUROC\n(x100, axis from 0)"
        assert [line.get_ydata()[0] for line in ax.get_lines()] == [50]  # chance
        assert_distinct([container.patches[0].get_facecolor() for container in ax.containers])
        assert [bool(c.patches[0].get_hatch()) for c in ax.containers] == [False, True, True]
        assert [bar.get_height() for bar in ax.containers[1]] == pytest.approx([90, 94])
    assert legend_texts(figure) == ["std (standard)", "rob (robust)", "rob2 (robust)", "chance (50)"]


def test_every_postprocessor_has_a_family():
    for name in POSTPROCESSORS.names():
        assert POSTPROCESSORS.get(name).family in FAMILIES, name
    for family, names in BUILTIN_FAMILIES.items():
        assert {POSTPROCESSORS.get(name).family for name in names} == {family}
    assert Postprocessor.family == "other"  # a plugin that names none
    assert set(plots.FAMILY_STYLE) == set(FAMILIES)


def tradeoff_points(figure) -> dict[tuple[str, str], tuple]:
    """(model, method) -> (AUROC, FPR, colour, marker) of each point."""
    return {(ax.get_title(), c.get_label()): (*c.get_offsets()[0], to_hex(c.get_facecolor()[0]), marker_of(c))
            for ax in figure.axes for c in ax.collections}


def test_tradeoff(run, tmp_path, monkeypatch):
    for fpr, label in (("classic", "ID-positive"), ("openood", "OpenOOD convention")):
        figure, files = plot(run, tmp_path / fpr, monkeypatch, "tradeoff", "--fpr", fpr)
        assert files == ["tradeoff_digits.pdf", "tradeoff_digits.png"]
        board = leaderboard_frame(ResultStore(run[0].parent / "results.sqlite", readonly=True), "digits", fpr=fpr)
        points = tradeoff_points(figure)
        assert set(points) == {(m, p) for m in ("digits-cnn", "copy") for p in POSTPROCESSORS_RUN}
        for row in board.to_dict("records"):
            auroc, fpr95, _, _ = points[(row["model"], row["postprocessor"])]
            assert (auroc, fpr95) == pytest.approx((100 * row["near-OOD|auroc"], 100 * row["near-OOD|fpr"]))
        for model in ("digits-cnn", "copy"):
            assert_distinct([points[(model, p)][2] for p in POSTPROCESSORS_RUN])
        markers = {p: points[("copy", p)][3] for p in POSTPROCESSORS_RUN}
        assert markers == {"msp": "o", "temp_scaling": "o", "ebo": "s", "mds": "D", "react": "^", "odin": "*"}
        assert {p: points[("digits-cnn", p)][2] for p in POSTPROCESSORS_RUN} == {
            p: points[("copy", p)][2] for p in POSTPROCESSORS_RUN}  # a method keeps its colour
        left = figure.axes[0]
        assert left.get_xlabel() == "near-OOD AUROC (x100, higher is better)"
        assert left.get_ylabel() == f"near-OOD FPR@95, {label}\n(x100, lower is better)"
        assert figure.axes[1].get_xlabel() == left.get_xlabel()
        assert "digits_6_9" in figure.get_suptitle()
        texts = [t for t in legend_texts(figure) if t]
        assert texts == ["softmax-based", "msp", "temp_scaling", "logit/energy-based", "ebo", "feature-based", "mds",
                         "activation shaping", "react", "gradient-based", "odin"]


def test_tradeoff_colours_for_many_methods_and_a_plugin_family():
    names = [f"m{i}" for i in range(25)]
    frame = pd.DataFrame({"model": "x", "postprocessor": names, "family": [FAMILIES[i % 6] for i in range(25)],
                          "auroc": np.linspace(60, 99, 25), "fpr": np.linspace(80, 5, 25)})
    figure = plots.tradeoff_figure(frame, "t")
    assert_paper_sized(figure)
    points = tradeoff_points(figure)
    assert_distinct([point[2] for point in points.values()])
    assert {name: point[3] for (_, name), point in points.items()} == {
        name: plots.FAMILY_STYLE[family][0] for name, family in zip(names, frame.family)}
    assert "other" in legend_texts(figure)


def test_tradeoff_names_a_benchmark_without_near_ood(run, experiment, monkeypatch):
    monkeypatch.setattr(experiment.benchmark, "near", [])
    with pytest.raises(OodbenchError, match="no near-OOD sets"):
        plots.tradeoff_data(experiment)


def test_unknown_kind_fails(run):
    experiment = CachedExperiment.open(run[0], cache_dir=str(run[1]))
    with pytest.raises(OodbenchError, match="unknown plot kind"):
        plots.build_plot("bogus", experiment)


@pytest.mark.parametrize("kind", ["hist", "tradeoff"])
def test_missing_results_say_run_first(run, tmp_path, capsys, kind):
    assert main(["plot", kind, str(run[0]), "--cache-dir", str(run[1]), "--results", str(tmp_path / "none.sqlite"),
                 "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "oodbench run" in err and len(err.strip().splitlines()) == 1
