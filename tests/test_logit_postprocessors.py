"""The logit-based postprocessors against their formulas, written again here in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from oodbench import Outputs, create_postprocessor

RNG = np.random.default_rng(7)
LOGITS = RNG.normal(0, 3, size=(64, 10)).astype(np.float32)
VAL_LOGITS = RNG.normal(0, 3, size=(200, 10)).astype(np.float32)
VAL_LABELS = np.argmax(VAL_LOGITS + RNG.normal(0, 2, size=VAL_LOGITS.shape), axis=1)


def softmax(f):
    e = np.exp(f - f.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def outputs(logits, labels=None):
    return Outputs(logits=torch.from_numpy(logits), labels=None if labels is None else torch.from_numpy(labels))


def score(name, logits=LOGITS, **params):
    method = create_postprocessor(name, **params)
    if method.needs_fit:
        method.fit(outputs(VAL_LOGITS, VAL_LABELS), outputs(VAL_LOGITS, VAL_LABELS))
    return method.score(outputs(logits)).numpy().astype(np.float64)


def test_msp():
    np.testing.assert_allclose(score("msp"), softmax(LOGITS.astype(np.float64)).max(axis=1), rtol=1e-5)


def test_max_logit():
    np.testing.assert_allclose(score("mls"), LOGITS.max(axis=1), rtol=1e-6)


def test_negative_entropy():
    p = softmax(LOGITS.astype(np.float64))
    np.testing.assert_allclose(score("entropy"), np.sum(p * np.log(p), axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.5, 10.0])
def test_energy(t):
    f = LOGITS.astype(np.float64) / t
    m = f.max(axis=1)
    expected = t * (m + np.log(np.exp(f - m[:, None]).sum(axis=1)))
    np.testing.assert_allclose(score("ebo", temperature=t), expected, rtol=1e-5)


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (0.5, 3), (2.0, 1)])
def test_gen(gamma, m):
    p = np.sort(softmax(LOGITS.astype(np.float64)), axis=1)[:, ::-1][:, : min(m, 10)]
    expected = -np.sum(p**gamma * (1 - p) ** gamma, axis=1)
    np.testing.assert_allclose(score("gen", gamma=gamma, top_m=m), expected, rtol=1e-4, atol=1e-6)


def test_temperature_scaling_fits_the_nll_minimum():
    def nll(log_t):
        p = softmax(VAL_LOGITS.astype(np.float64) / np.exp(log_t))
        return -np.mean(np.log(p[np.arange(len(VAL_LABELS)), VAL_LABELS]))

    t = float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded", options={"xatol": 1e-8}).x))
    method = create_postprocessor("temp_scaling")
    method.fit(outputs(VAL_LOGITS, VAL_LABELS), outputs(VAL_LOGITS, VAL_LABELS))
    assert method.temperature == pytest.approx(t, rel=1e-3)
    # reported as the log-odds of max softmax(f / T): monotone in the MSP, so every metric is the same
    msp = softmax(LOGITS.astype(np.float64) / t).max(axis=1)
    np.testing.assert_allclose(score("temp_scaling"), np.log(msp / (1 - msp)), rtol=1e-3, atol=1e-6)


def nll_numpy(logits, labels, t):
    z = logits.astype(np.float64) / t
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


def separable(margin, n=400, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, size=(n, classes))
    labels = rng.integers(0, classes, n)
    logits[np.arange(n), labels] = logits.max(axis=1) + margin
    return logits.astype(np.float32), labels


def calibration_case(kind):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, size=(400, 10))
    labels = np.argmax(logits + rng.normal(0, 2, size=logits.shape), axis=1)
    scale = {"over-confident": 6.0, "under-confident": 0.2, "random-labels": 1.0}[kind]
    if kind == "random-labels":
        labels = rng.integers(0, 10, 400)
    return (logits * scale).astype(np.float32), labels


@pytest.mark.parametrize("case", ["margin-5", "margin-10", "margin-20", "margin-40", "over-confident",
                                  "under-confident", "random-labels"])
def test_temperature_fit_reaches_the_bounded_optimum_of_a_brute_force_grid(case):
    """The fitted T has the smallest NLL of a fine grid over [0.05, 100] (to float precision),
    including the bound itself when the NLL is monotone (separable data: T = 0.05)."""
    from oodbench.postprocessors.calibrated import T_RANGE, fit_temperature

    logits, labels = separable(int(case.split("-")[1])) if case.startswith("margin") else calibration_case(case)
    grid = np.exp(np.linspace(np.log(T_RANGE[0]), np.log(T_RANGE[1]), 3001))
    losses = np.array([nll_numpy(logits, labels, t) for t in grid])
    t = fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels))
    assert T_RANGE[0] <= t <= T_RANGE[1]
    assert nll_numpy(logits, labels, t) <= losses.min() + 1e-12 * max(1.0, losses.min())
    best = grid[losses.argmin()]
    assert abs(np.log(t) - np.log(best)) <= np.log(grid[1] / grid[0]) + 1e-9
    if case.startswith("margin"):
        assert t == T_RANGE[0]  # the NLL falls all the way to the bound
    expected = {"over-confident": lambda t: t > 1, "under-confident": lambda t: t < 1}
    assert expected.get(case, lambda t: True)(t)


def test_temperature_scaling_keeps_ranks_when_the_softmax_saturates():
    from oodbench.postprocessors.calibrated import T_RANGE

    logits = np.array([[30.0, 0.0], [20.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    method = create_postprocessor("temp_scaling")
    method.temperature = T_RANGE[0]  # the smallest T the fit returns (perfect validation accuracy)
    assert (softmax(logits / method.temperature).max(axis=1).astype(np.float32) == 1).all()  # MSP ties
    scores = method.score(outputs(logits)).numpy()
    assert scores[0] > scores[1] > scores[2]


def test_temperature_scaling_orders_scaled_margins_far_past_float_precision():
    """Scaled margins 30..80 (float64 MSP is 1.0 from ~37 on) at T = 1 and, at the smallest fitted
    T, raw margins 30..80 (scaled 600..1600, where even log MSP underflows to 0 past ~745): every
    score distinct, increasing with the margin, and the log-odds -log(sum_{j != top} exp(-d_j / T))."""
    from oodbench.postprocessors.calibrated import T_RANGE

    margins = np.linspace(30, 80, 401)
    gaps = margins[:, None] + np.linspace(0, 2, 9)  # the other 9 classes lie d_j below the top
    logits = np.concatenate([np.zeros((len(margins), 1)), -gaps], axis=1)
    for temperature in (1.0, T_RANGE[0]):
        method = create_postprocessor("temp_scaling")
        method.temperature = temperature
        scores = method.score(outputs(logits)).numpy()
        scaled = gaps / temperature
        expected = scaled[:, 0] - np.log(np.exp(-(scaled - scaled[:, :1])).sum(axis=1))
        assert (np.diff(scores) > 0).all()
        np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_temperature_scaling_ranks_ordinary_scores_as_the_msp():
    """Where the float64 MSP is not saturated, the log-odds orders samples exactly as max softmax(f / T)
    (rank-identical) and equals log(p / (1 - p)) to 1e-9 (relative)."""
    method = create_postprocessor("temp_scaling")
    method.fit(outputs(VAL_LOGITS, VAL_LABELS), outputs(VAL_LOGITS, VAL_LABELS))
    scores = method.score(outputs(LOGITS)).numpy()
    msp = softmax(LOGITS.astype(np.float64) / method.temperature).max(axis=1)
    assert msp.max() < 1 - 1e-6 and len(np.unique(msp)) == len(msp)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(msp))
    np.testing.assert_allclose(scores, np.log(msp) - np.log1p(-msp), rtol=1e-9)


def test_kl_matching():
    p_val = softmax(VAL_LOGITS.astype(np.float64))
    predicted = p_val.argmax(axis=1)
    templates = np.stack([p_val[predicted == c].mean(axis=0) for c in np.unique(predicted)])
    p = softmax(LOGITS.astype(np.float64))
    kl = np.array([[np.sum(pi * (np.log(pi) - np.log(q))) for q in templates] for pi in p])
    np.testing.assert_allclose(score("klm"), -kl.min(axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["msp", "mls", "entropy", "ebo", "gen", "klm", "temp_scaling"])
def test_batched_equals_one_shot(name):
    whole = score(name)
    pieces = np.concatenate([score(name, LOGITS[i : i + 7]) for i in range(0, len(LOGITS), 7)])
    np.testing.assert_allclose(pieces, whole, rtol=1e-6)


SATURATED = np.zeros((3, 10), dtype=np.float32)
SATURATED[:, 0] = [30.0, 25.0, 16.0]  # float32 softmax: 1.0, 1.0, 0.999999


def reference_float64(name, logits):
    p = softmax(logits.astype(np.float64))
    if name == "msp":
        return p.max(axis=1)
    if name == "entropy":
        return np.sum(p * np.log(p), axis=1)
    top = np.sort(p, axis=1)[:, ::-1]
    return -np.sum(top**0.1 * (1 - top) ** 0.1, axis=1)


@pytest.mark.parametrize("name", ["msp", "entropy", "gen"])
def test_softmax_scores_keep_saturated_samples_in_order(name):
    """Margins 30 > 25 > 16 score in that order (float32 would tie the first two at MSP 1.0,
    and drop GEN's top term), with the float64 formula's values."""
    assert (softmax(SATURATED)[:2].max(axis=1).astype(np.float32) == 1).all()
    scores = score(name, SATURATED)
    assert scores[0] > scores[1] > scores[2]
    np.testing.assert_allclose(scores, reference_float64(name, SATURATED), rtol=1e-4)
    grid = create_postprocessor(name).score_grid(outputs(SATURATED), [{}])[0] if name == "gen" else None
    assert grid is None or torch.equal(grid, create_postprocessor(name).score(outputs(SATURATED)))


def test_temperature_scaling_keeps_saturated_samples_in_order():
    method = create_postprocessor("temp_scaling")
    method.fit(outputs(VAL_LOGITS, VAL_LABELS), outputs(VAL_LOGITS, VAL_LABELS))
    scores = method.score(outputs(SATURATED))
    assert scores.dtype == torch.float64
    assert scores[0] > scores[1] > scores[2]


def test_kl_matching_tells_saturated_samples_apart():
    """KL to the templates is not monotone in the margin; the float64 values differ by ~3e-9
    here (float32 would tie them) and follow the float64 formula's order."""
    p_val = softmax(VAL_LOGITS.astype(np.float64))
    predicted = p_val.argmax(axis=1)
    templates = np.stack([p_val[predicted == c].mean(axis=0) for c in np.unique(predicted)])
    p = softmax(SATURATED.astype(np.float64))
    expected = -np.array([[np.sum(pi * (np.log(pi) - np.log(q))) for q in templates] for pi in p]).min(axis=1)
    scores = score("klm", SATURATED)
    assert len(set(scores.tolist())) == 3
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(expected))
    np.testing.assert_allclose(scores, expected, rtol=1e-9)


def test_openoods_temperature_fit_is_its_fifty_lbfgs_steps():
    """fit: openood is OpenOOD v1.5's procedure (T from 1.5, LBFGS lr 0.01, max_iter 50, float32),
    written out here; on over-confident logits it stops short of the exact optimum."""
    from oodbench.postprocessors.calibrated import fit_temperature

    logits, labels = calibration_case("over-confident")
    temperature = torch.nn.Parameter(torch.ones(1) * 1.5)
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)
    criterion = torch.nn.CrossEntropyLoss()
    data, target = torch.from_numpy(logits), torch.from_numpy(labels)

    def evaluate():
        optimizer.zero_grad()
        loss = criterion(data / temperature, target)
        loss.backward()
        return loss

    optimizer.step(evaluate)
    method = create_postprocessor("temp_scaling", fit="openood")
    method.fit(outputs(logits, labels), outputs(logits, labels))
    assert method.temperature == pytest.approx(temperature.item(), rel=1e-6)
    exact = fit_temperature(data, target)
    assert nll_numpy(logits, labels, exact) < nll_numpy(logits, labels, method.temperature) - 1e-3
