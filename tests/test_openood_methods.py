"""OpenOOD v1.5's methods on cached outputs (openmax, she, nnguide, relation, fdbd, nci,
vra, grood, cfood) against their formulas, written again here sample by sample in NumPy
(GrOOD's gradient by autograd) on fixed inputs; scoring in blocks and in parts equals
one-shot scoring; errors on data a method cannot use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from oodbench.errors import OodbenchError
from oodbench.postprocessors import neighbours
from oodbench.postprocessors.base import InvalidHyperparameter, Outputs
from oodbench.registry import POSTPROCESSORS

N_TRAIN, N_TEST, DIM, CLASSES = 240, 40, 12, 4
METHODS = ["openmax", "she", "nnguide", "relation", "fdbd", "nci", "vra", "grood", "cfood"]


def as_outputs(z: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> Outputs:
    z, w, b = (torch.tensor(a, dtype=torch.float32) for a in (z, weight, bias))
    return Outputs(logits=z @ w.T + b, features=z, labels=torch.tensor(labels), fc=(w, b))


@pytest.fixture(scope="module")
def data():
    """Non-negative class-clustered features, a classifier aligned with the class centres
    (most train samples classified correctly), test samples half ID, half shifted."""
    rng = np.random.default_rng(7)
    blocks = np.kron(np.eye(CLASSES), np.ones(DIM // CLASSES))  # class c lives on its own block of units
    centres = 0.5 + 2.0 * blocks + rng.gamma(1.0, 0.3, size=(CLASSES, DIM))
    weight = blocks + rng.normal(0, 0.3, size=(CLASSES, DIM))
    bias = rng.normal(0, 0.5, size=CLASSES)
    train_labels = np.arange(N_TRAIN) % CLASSES
    train = centres[train_labels] + rng.gamma(1.5, 0.8, size=(N_TRAIN, DIM))
    test = centres[rng.integers(0, CLASSES, N_TEST)] + rng.gamma(1.5, 0.8, size=(N_TEST, DIM))
    test[N_TEST // 2:] = rng.gamma(1.0, 2.0, size=(N_TEST - N_TEST // 2, DIM))
    d = {"train_out": as_outputs(train, train_labels, weight, bias),
         "test_out": as_outputs(test, np.full(N_TEST, -1), weight, bias)}
    for name in ("train", "test"):  # the references read exactly the float32 values the methods see
        d[name] = d[f"{name}_out"].features.double().numpy()
        d[f"{name}_logits"] = d[f"{name}_out"].logits.double().numpy()
    d["train_labels"] = train_labels
    d["W"] = d["train_out"].fc[0].double().numpy()
    d["b"] = d["train_out"].fc[1].double().numpy()
    return d


def run(name: str, d, **params) -> np.ndarray:
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(d["train_out"], d["train_out"])
    return method.score(d["test_out"]).double().numpy()


def correct(d) -> np.ndarray:
    return d["train_logits"].argmax(axis=1) == d["train_labels"]


# ----------------------------------------------------------------- NumPy references


def ref_weibull(tail: np.ndarray) -> tuple[float, float, float]:
    """libmr 0.1.9's fit_high: x = tail + 1 - min(tail); the MLE shape k solves
    1/k + mean(log x) - sum(x^k log x) / sum(x^k) = 0 (bisection on log k), scale = mean(x^k)^(1/k)."""
    shift = 1 - tail.min()
    logs = np.log(tail + shift)
    top = logs.max()

    def equation(k):
        return 1 / k + logs.mean() - softmax(k * (logs - top)) @ logs

    low, high = 1e-3, 1e12
    for _ in range(300):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if equation(mid) > 0 else (low, mid)
    k = math.sqrt(low * high)
    scale = math.exp(top + (logsumexp(k * (logs - top)) - math.log(len(logs))) / k)
    return scale, k, shift


def ref_openmax(d, alpha=3, tail_size=20):
    logits, labels, ok = d["train_logits"], d["train_labels"], correct(d)
    models = []
    for c in range(CLASSES):
        rows = logits[ok & (labels == c)]
        mav = rows.mean(axis=0)
        distances = np.sqrt(((rows - mav) ** 2).sum(axis=1))
        models.append((mav, *ref_weibull(np.sort(distances)[-tail_size:])))
    scores = []
    for f in d["test_logits"]:
        ranked = f.argsort()[::-1][:alpha]
        omega = np.zeros(CLASSES)
        omega[ranked] = [(alpha + 1 - i) / alpha for i in range(1, alpha + 1)]
        revised, unknown = [], []
        for c, (mav, scale, shape, shift) in enumerate(models):
            shifted = np.linalg.norm(f - mav) + shift
            w = 1 - math.exp(-((shifted / scale) ** shape)) if shifted >= 0 else 0.0  # libMR: 0 below the support
            revised.append(f[c] * (1 - w * omega[c]))
            unknown.append(f[c] - revised[-1])
        total = np.exp(revised).sum() + np.exp(np.sum(unknown))
        scores.append(np.log(np.sum(np.exp(revised) / total)))  # log(1 - p_unknown), OpenOOD's -p_unknown
    return np.array(scores)


def ref_she(d, metric="inner_product"):
    z, y, ok = d["train"], d["train_labels"], correct(d)
    patterns = np.stack([z[ok & (y == c)].mean(axis=0) for c in range(CLASSES)])
    scores = []
    for feature, f in zip(d["test"], d["test_logits"]):
        m = patterns[f.argmax()]
        scores.append({"inner_product": feature @ m, "euclidean": -np.linalg.norm(feature - m),
                       "cosine": feature @ m / (np.linalg.norm(feature) * np.linalg.norm(m))}[metric])
    return np.array(scores)


def ref_fdbd(d, distance_as_normalizer=True):
    mean, w = d["train"].mean(axis=0), d["W"]
    scores = []
    for z, f in zip(d["test"], d["test_logits"]):
        p = f.argmax()
        total = sum((f[p] - f[c]) / np.linalg.norm(w[p] - w[c]) for c in range(CLASSES) if c != p)
        scores.append(total / np.linalg.norm(z - mean if distance_as_normalizer else z))
    return np.array(scores)


def ref_nci(d, alpha=1e-4):
    mean, w = d["train"].mean(axis=0), d["W"]
    return np.array([w[f.argmax()] @ (z - mean) / np.linalg.norm(z - mean) + alpha * np.abs(z).sum()
                     for z, f in zip(d["test"], d["test_logits"])])


def ref_vra(d, percentile_high=90, percentile_low=10):
    low, high = np.percentile(d["train"], percentile_low), np.percentile(d["train"], percentile_high)
    return logsumexp(np.clip(d["test"], low, high) @ d["W"].T + d["b"], axis=1)


def ref_nnguide(d, k=100, alpha=0.01):
    size = min(N_TRAIN, max(math.ceil(alpha * N_TRAIN), k))
    bank = d["train"][:size] / np.linalg.norm(d["train"][:size], axis=1, keepdims=True)
    guides = bank * logsumexp(d["train_logits"][:size], axis=1)[:, None]
    scores = []
    for z, f in zip(d["test"], d["test_logits"]):
        similarities = np.sort(guides @ (z / np.linalg.norm(z)))[::-1]
        scores.append(similarities[:k].mean() * logsumexp(f))
    return np.array(scores)


def ref_nnguide_openood(d, k=100, alpha=0.01, bank_batch=200):
    """NNGuidePostprocessor.setup and postprocess: the train loader's batches (in order) are added
    to the bank until len(batches) * batch_size > int(N * alpha); features normalised as
    x / ||x|| + 1e-10; the mean of faiss's k largest inner products (exact) times the energy."""
    normalizer = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    feats, logits = [], []
    for start in range(0, N_TRAIN, bank_batch):
        feats.append(normalizer(d["train"][start:start + bank_batch]))
        logits.append(d["train_logits"][start:start + bank_batch])
        if len(feats) * bank_batch > int(N_TRAIN * alpha):
            break
    guides = np.concatenate(feats) * logsumexp(np.concatenate(logits), axis=-1)[:, None]
    similarities = np.sort(normalizer(d["test"]) @ guides.T, axis=1)[:, ::-1]
    return similarities[:, :k].mean(axis=1) * logsumexp(d["test_logits"], axis=-1)


def ref_relation(d, pow=1):
    unit = lambda z: z / np.sqrt((z ** 2).sum(axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    bank, bank_p = unit(d["train"]), softmax(d["train_logits"], axis=1)
    scores = []
    for z, f in zip(d["test"], d["test_logits"]):
        edges = np.maximum(bank @ unit(z), 0) * (bank_p @ softmax(f))
        edges = edges[np.abs(edges) > 0.03]
        scores.append((np.sign(edges) * np.abs(edges) ** pow).sum())
    return np.array(scores)


def ref_cfood(d, alpha=1, k=0.01):
    """alpha = 1 only: every fit sample is a reference (no random subset)."""
    assert alpha == 1
    unit = lambda z: z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    refs = unit(d["train"])
    n = len(refs)
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knn = np.stack([np.sort(((r - refs) ** 2).sum(axis=1))[kpos + 1] for r in refs])
    scores = []
    for v in unit(d["test"]):
        count = (knn >= ((v - refs) ** 2).sum(axis=1)[:, None]).sum(axis=0) / n
        hits = np.nonzero(count >= k)[0]
        scores.append(-(kval[hits[0]] if len(hits) else 1.0))
    return np.array(scores)


def ref_grood(d):
    """The gradient of the nearest-centroid cross-entropy w.r.t. the noise prototype, by autograd."""
    z, y = torch.tensor(d["train"]), torch.tensor(d["train_labels"])
    prototypes = torch.stack([z[y == c].mean(dim=0) for c in range(CLASSES)])

    def gradients(features, logits):
        noise = prototypes.mean(dim=0).clone().requires_grad_(True)
        rows = []
        for feature, target in zip(torch.tensor(features), torch.tensor(logits).argmax(dim=1)):
            centres = torch.cat([prototypes, noise[None]])
            loss = torch.nn.functional.cross_entropy(-(feature - centres).norm(dim=1)[None], target[None])
            rows.append(torch.autograd.grad(loss, noise)[0])
        return torch.stack(rows).numpy()

    ok = correct(d)
    bank = gradients(d["train"][ok], d["train_logits"][ok])
    test = gradients(d["test"], d["test_logits"])
    return np.array([-((bank - g) ** 2).sum(axis=1).min() for g in test])


# ----------------------------------------------------------------- formula tests

CASES = [
    ("openmax", {}, ref_openmax),
    ("openmax", {"alpha": 2, "tail_size": 10}, ref_openmax),
    ("she", {}, ref_she),
    ("she", {"metric": "euclidean"}, ref_she),
    ("she", {"metric": "cosine"}, ref_she),
    ("fdbd", {}, ref_fdbd),
    ("fdbd", {"distance_as_normalizer": False}, ref_fdbd),
    ("nci", {}, ref_nci),
    ("nci", {"alpha": 0.1}, ref_nci),
    ("vra", {}, ref_vra),
    ("vra", {"percentile_high": 99, "percentile_low": 1}, ref_vra),
    ("nnguide", {}, ref_nnguide),
    ("nnguide", {"k": 10, "alpha": 0.5}, ref_nnguide),
    # OpenOOD's bank: 150 rows (3 batches of 50 pass int(120)); 200 (one batch passes int(2.4));
    # all 240 (the loop ends on the partial second batch before passing int(216))
    ("nnguide", {"k": 10, "alpha": 0.5, "bank_batch": 50}, ref_nnguide_openood),
    ("nnguide", {"k": 100, "alpha": 0.01, "bank_batch": 200}, ref_nnguide_openood),
    ("nnguide", {"k": 30, "alpha": 0.9, "bank_batch": 200}, ref_nnguide_openood),
    ("relation", {}, ref_relation),
    ("relation", {"pow": 4}, ref_relation),
    ("cfood", {"alpha": 1}, ref_cfood),
    ("cfood", {"alpha": 1, "k": 0.05}, ref_cfood),
    ("grood", {}, ref_grood),
]


@pytest.mark.parametrize("name,params,reference", CASES, ids=[f"{name}-{params}" for name, params, _ in CASES])
def test_matches_its_reference_formula(data, name, params, reference):
    """Scores are float32: equal to the float64 reference up to float32 rounding (OpenOOD's NNGuide
    adds 1e-10 to each unit coordinate: a change of ~1e-9 relative)."""
    np.testing.assert_allclose(run(name, data, **params), reference(data, **params), rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha, bank_batch, rows", [(0.5, 50, 150), (0.01, 200, 200), (0.9, 200, 240),
                                                     (0.5, None, 120), (0.01, None, 100)])
def test_nnguide_bank_holds_openoods_whole_batches_or_the_exact_share(data, alpha, bank_batch, rows):
    """OpenOOD's rule (bank_batch, the openood profile's 200) against ceil(alpha N) (null, the
    paper's, floored at K = 100); the bank sizes differ, so do the scores."""
    method = POSTPROCESSORS.get("nnguide")(alpha=alpha, bank_batch=bank_batch, k=min(100, rows))
    method.fit(data["train_out"], data["train_out"])
    assert len(method.guides) == rows
    if bank_batch is not None:
        exact = run("nnguide", data, alpha=alpha, k=min(100, rows))
        assert not np.allclose(method.score(data["test_out"]).double().numpy(), exact, rtol=1e-4)


def test_the_cases_cover_every_method():
    assert {name for name, *_ in CASES} == set(METHODS)
    assert all(name in POSTPROCESSORS for name in METHODS)


def test_references_separate_id_from_shifted_samples(data):
    """The fixed inputs are informative: every method ranks the ID half above the shifted half on average."""
    for name in METHODS:
        scores = run(name, data)
        assert scores[: N_TEST // 2].mean() > scores[N_TEST // 2:].mean(), name


@pytest.mark.parametrize("name", METHODS)
def test_blocks_and_parts_equal_one_shot(data, name, monkeypatch):
    whole = run(name, data)
    monkeypatch.setattr(neighbours, "BANK_BLOCK_ELEMENTS", 3 * N_TRAIN)  # three test rows per block
    method = POSTPROCESSORS.get(name)()
    method.fit(data["train_out"], data["train_out"])
    test = data["test_out"]
    half = N_TEST // 2
    parts = [Outputs(logits=test.logits[s], features=test.features[s], fc=test.fc) for s in (slice(0, half),
                                                                                             slice(half, None))]
    np.testing.assert_array_equal(torch.cat([method.score(p) for p in parts]).double().numpy(), whole)


def test_relation_scores_its_earlier_formula_bit_for_bit(data):
    """Relation's in-place edges (the clamp at 0 left to the threshold, NaN edges dropped) give
    the scores of its earlier formula (clamp, then torch.where, then pow) bit for bit, every
    power of a search at once, with a test row of NaN features among them."""
    test = data["test_out"]
    test = Outputs(logits=test.logits, features=test.features.clone(), fc=test.fc)
    test.features[3] = float("nan")
    method = POSTPROCESSORS.get("relation")()
    method.fit(data["train_out"], data["train_out"])
    unit = neighbours.relation_unit
    similarity = (unit(test.features) @ unit(method.bank_features).T).clamp_min(0)
    edges = similarity * (torch.softmax(test.logits.double(), dim=1)
                          @ torch.softmax(method.bank_logits.double(), dim=1).T)
    edges = torch.where(edges > neighbours.RELATION_THRESHOLD, edges, 0)
    powers = [1, 2, 4, 0.5, 6]
    for power, scores in zip(powers, method.score_grid(test, [{"pow": p} for p in powers])):
        assert torch.equal(scores, edges.pow(power).sum(dim=1).float()), power
    assert method.score(test)[3] == 0


@pytest.mark.parametrize("alpha", [0.1, 0.42, 1])
def test_cfood_bisection_finds_the_counts_kappa_bit_for_bit(data, alpha, monkeypatch):
    """CFOOD's two ways to kappa* (the cumulative counts of searchsorted positions, for many k
    or several blocks of references; a bisection over the grid, for few k) agree bit for bit,
    for k from below one reference to above all (kappa* = 1; k n just above a whole number
    among them), in blocks of a few test rows,
    with fit rows among the test rows (test distances equal to some d_j: ties), and a test
    row of NaN features (the counts' rule) is scored as the counts score it."""
    test, train = data["test_out"], data["train_out"]  # fit rows among the test rows: distances tied to d_j
    test = Outputs(logits=torch.cat([test.logits, train.logits[:30]]), fc=test.fc,
                   features=torch.cat([test.features, train.features[:30]]))
    with_nan = Outputs(logits=test.logits, features=test.features.clone(), fc=test.fc)
    with_nan.features[5] = float("nan")
    # at alpha = 0.42 (100 references), k = 0.07 and 0.14 need 7.000000000000001 and 14.000000000000002
    combos = [{"k": k} for k in (0.001, 0.004, 0.01, 0.05, 0.07, 0.14, 0.2, 0.6, 0.99, 1.0)]
    method = POSTPROCESSORS.get("cfood")(alpha=alpha)
    method.fit(data["train_out"], data["train_out"])
    bisections = []
    monkeypatch.setattr(neighbours, "first_reaching", lambda *a, was=neighbours.first_reaching: bisections.append(1)
                        or was(*a))
    for outputs in (test, with_nan):
        bisections.clear()
        monkeypatch.setattr(neighbours, "CFOOD_BISECT_PASSES", 0)
        counted = method.score_grid(outputs, combos)
        assert not bisections
        monkeypatch.setattr(neighbours, "CFOOD_BISECT_PASSES", 1000)
        monkeypatch.setattr(neighbours, "CFOOD_BISECT_ROWS", 7)
        bisected = method.score_grid(outputs, combos)
        assert len(bisections) == (10 if outputs is test else 0)  # 70 rows, 7 at a time; NaN: counted
        for combo, one, other in zip(combos, counted, bisected):
            assert torch.equal(one, other), combo
        assert len({float(s) for scores in counted for s in scores}) > 10  # many kappa* values, 1 among them
        assert float(counted[-1].min()) == -1.0


def test_cfood_subset_is_seeded_and_sized(data):
    first = POSTPROCESSORS.get("cfood")(alpha=0.5)
    first.fit(data["train_out"], data["train_out"])
    second = POSTPROCESSORS.get("cfood")(alpha=0.5)
    second.fit(data["train_out"], data["train_out"])
    assert len(first.reference_rows) == N_TRAIN // 2 == len(first.reference_rows.unique())
    assert torch.equal(first.reference_rows, second.reference_rows)
    assert torch.equal(first.score(data["test_out"]), second.score(data["test_out"]))


def test_weibull_fit_is_the_maximum_likelihood(data):
    """openmax's fit against the reference's parametrisation and solver, on a wide and a narrow tail."""
    from oodbench.postprocessors.openmax import fit_weibull

    rng = np.random.default_rng(1)
    for tail in (rng.gamma(2.0, 3.0, size=20), 5 + rng.random(20) * 1e-3):
        np.testing.assert_allclose(fit_weibull(tail), ref_weibull(tail), rtol=1e-9)


def test_unusable_data_fails_in_one_line(data):
    train = data["train_out"]
    one_class_wrong = Outputs(logits=train.logits, features=train.features,
                              labels=torch.where(train.labels == 0, 1, train.labels), fc=train.fc)
    for name in ("openmax", "she"):
        with pytest.raises(OodbenchError, match=rf"^{name}: .*class.*\b0\b") as error:
            POSTPROCESSORS.get(name)().fit(one_class_wrong, one_class_wrong)
        assert "\n" not in str(error.value)
    with pytest.raises(InvalidHyperparameter, match="alpha=5 must be at most the 4 classes"):
        method = POSTPROCESSORS.get("openmax")(alpha=5)
        method.fit(train, train)
        method.score(data["test_out"])
    with pytest.raises(InvalidHyperparameter, match="k=500 must be at most the 240 fit samples"):
        run("nnguide", data, k=500)
    with pytest.raises(InvalidHyperparameter, match="percentile_low=50 must not exceed percentile_high=40"):
        run("vra", data, percentile_low=50, percentile_high=40)
    with pytest.raises(InvalidHyperparameter, match="cfood: alpha=0.001 keeps 0 of the 240"):
        run("cfood", data, alpha=0.001)
