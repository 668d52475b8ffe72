"""Feature-based and activation-shaping postprocessors against their formulas, written
again here in NumPy on fixed random features; batched == one-shot; blocked fitting ==
one-block fitting; errors for invalid hyperparameters; the cache carries (W, b); and the
memory bound of scoring 50,000 train against 100,000 test features of dimension 512."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from oodbench.storage.caches import OutputCache
from oodbench.benchmark.extraction import extract
from oodbench.errors import OodbenchError
from oodbench.postprocessors import distance, subspace
from oodbench.postprocessors.base import InvalidHyperparameter, Outputs
from oodbench.registry import POSTPROCESSORS

N_TRAIN, N_TEST, DIM, CLASSES = 300, 60, 24, 5


def make_data(seed: int = 0):
    """Class-structured positive features (no ties), a random classifier, logits = W z + b."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(CLASSES, DIM))
    bias = rng.normal(size=CLASSES)
    centres = rng.gamma(2.0, 1.0, size=(CLASSES, DIM))

    def sample(n: int, shift: float):
        labels = rng.integers(0, CLASSES, n)
        features = centres[labels] + shift + rng.gamma(1.5, 0.5, size=(n, DIM))
        return features, labels

    train, train_labels = sample(N_TRAIN, 0.0)
    test, test_labels = sample(N_TEST, 0.0)
    test[N_TEST // 2:] += rng.gamma(1.0, 1.5, size=(N_TEST - N_TEST // 2, DIM))  # half shifted: OOD-like
    return {"W": weight, "b": bias, "train": train, "train_labels": train_labels, "test": test,
            "test_labels": test_labels}


def as_outputs(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> Outputs:
    z = torch.tensor(features, dtype=torch.float32)
    w, b = torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)
    return Outputs(logits=z @ w.T + b, features=z, labels=torch.tensor(labels), fc=(w, b))


@pytest.fixture(scope="module")
def data():
    d = make_data()
    d["train_out"] = as_outputs(d["train"], d["train_labels"], d["W"], d["b"])
    d["test_out"] = as_outputs(d["test"], d["test_labels"], d["W"], d["b"])
    # the references use exactly the float32 values the methods see
    for name in ("train", "test"):
        d[name] = d[f"{name}_out"].features.double().numpy()
        d[f"{name}_logits"] = d[f"{name}_out"].logits.double().numpy()
    d["W"] = d["train_out"].fc[0].double().numpy()
    d["b"] = d["train_out"].fc[1].double().numpy()
    return d


def run(name: str, data, **params) -> np.ndarray:
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(data["train_out"], data["train_out"])
    return method.score(data["test_out"]).double().numpy()


# ----------------------------------------------------------------- NumPy references


def ref_mds(d, relative: bool = False):
    z, y = d["train"], d["train_labels"]
    classes = np.unique(y)
    means = np.stack([z[y == c].mean(axis=0) for c in classes])
    centred = z - means[np.searchsorted(classes, y)]
    prec = np.linalg.pinv(centred.T @ centred / len(z))
    diffs = d["test"][:, None, :] - means[None]
    dist = np.einsum("ncd,de,nce->nc", diffs, prec, diffs)
    score = (-dist).max(axis=1)
    if relative:
        mu0 = z.mean(axis=0)
        prec0 = np.linalg.pinv((z - mu0).T @ (z - mu0) / len(z))
        d0 = d["test"] - mu0
        score = score + np.einsum("nd,de,ne->n", d0, prec0, d0)
    return score


def unit_rows(d):
    """The data with train and test features scaled to unit L2 norm (Mahalanobis++)."""
    return {**d, "train": d["train"] / np.linalg.norm(d["train"], axis=1, keepdims=True),
            "test": d["test"] / np.linalg.norm(d["test"], axis=1, keepdims=True)}


def ref_knn(d, k):
    bank = d["train"] / np.linalg.norm(d["train"], axis=1, keepdims=True)
    query = d["test"] / np.linalg.norm(d["test"], axis=1, keepdims=True)
    distances = np.linalg.norm(query[:, None, :] - bank[None], axis=2)
    return -np.sort(distances, axis=1)[:, k - 1]


def ref_vim(d, dim):
    w, b = d["W"], d["b"]
    u = -np.linalg.pinv(w) @ b
    x = d["train"] - u
    values, vectors = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(-values)
    null_space = vectors[:, order[dim:]]
    train_residual = np.linalg.norm(x @ null_space, axis=1)
    alpha = d["train_logits"].max(axis=1).mean() / train_residual.mean()
    residual = np.linalg.norm((d["test"] - u) @ null_space, axis=1)
    return logsumexp(d["test_logits"], axis=1) - alpha * residual


def energy(d, z, weight=None):
    return logsumexp(z @ (d["W"] if weight is None else weight).T + d["b"], axis=1)


def ref_react(d, p):
    return energy(d, np.minimum(d["test"], np.percentile(d["train"], p)))


def ref_ash(d, p, variant):
    out = np.zeros_like(d["test"])
    k = DIM - int(np.round(DIM * p / 100))
    for i, z in enumerate(d["test"]):
        top = np.argsort(-z)[:k]
        if variant == "b":
            out[i, top] = z.sum() / k
        elif variant == "p":
            out[i, top] = z[top]
        else:
            out[i, top] = z[top] * np.exp(z.sum() / z[top].sum())
    return energy(d, out)


def ref_scale(d, p):
    k = DIM - int(np.round(DIM * p / 100))
    top_sum = -np.sort(-d["test"], axis=1)[:, :k].sum(axis=1)
    return energy(d, d["test"] * np.exp(d["test"].sum(axis=1) / top_sum)[:, None])


def ref_dice(d, p):
    contribution = d["W"] * d["train"].mean(axis=0)[None]
    masked = d["W"] * (contribution > np.percentile(contribution, p))
    return energy(d, d["test"], masked)


def ref_gradnorm(d):
    p = softmax(d["test_logits"], axis=1)
    grads = np.einsum("nc,nd->ncd", p - 1 / CLASSES, d["test"])  # dLoss/dW, one C x D matrix per sample
    return np.abs(grads).sum(axis=(1, 2))


CASES = [
    ("mds", {}, lambda d: ref_mds(d)),
    ("rmds", {}, lambda d: ref_mds(d, relative=True)),
    ("mds_pp", {}, lambda d: ref_mds(unit_rows(d))),
    ("rmds_pp", {}, lambda d: ref_mds(unit_rows(d), relative=True)),
    ("knn", {"k": 1}, lambda d: ref_knn(d, 1)),
    ("knn", {"k": 7}, lambda d: ref_knn(d, 7)),
    ("vim", {"dim": 6}, lambda d: ref_vim(d, 6)),
    ("vim", {"dim": 20}, lambda d: ref_vim(d, 20)),
    ("react", {"percentile": 90}, lambda d: ref_react(d, 90)),
    ("react", {"percentile": 60}, lambda d: ref_react(d, 60)),
    ("ash", {}, lambda d: ref_ash(d, 90, "b")),
    ("ash", {"percentile": 70, "variant": "p"}, lambda d: ref_ash(d, 70, "p")),
    ("ash", {"percentile": 65, "variant": "s"}, lambda d: ref_ash(d, 65, "s")),
    ("scale", {}, lambda d: ref_scale(d, 85)),
    ("scale", {"percentile": 65}, lambda d: ref_scale(d, 65)),
    ("dice", {}, lambda d: ref_dice(d, 90)),
    ("dice", {"percentile": 50}, lambda d: ref_dice(d, 50)),
    ("gradnorm", {}, ref_gradnorm),
]


@pytest.mark.parametrize("name,params,reference", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_matches_numpy_formula(name, params, reference, data):
    expected = reference(data)
    got = run(name, data, **params)
    assert got.shape == (N_TEST,)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-4 * np.abs(expected).max())
    assert np.std(expected) > 0  # the case is not degenerate


def test_gradnorm_equals_the_autograd_gradient(data):
    """The factorised form equals the L1 norm of the real last-layer gradient."""
    layer = torch.nn.Linear(DIM, CLASSES).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(data["W"]))
        layer.bias.copy_(torch.tensor(data["b"]))
    norms = []
    for z in torch.tensor(data["test"][:10]):
        layer.zero_grad()
        log_p = torch.log_softmax(layer(z[None]), dim=1)
        loss = torch.sum(-torch.full_like(log_p, 1 / CLASSES) * log_p)  # KL(uniform || p) + const
        loss.backward()
        norms.append(layer.weight.grad.abs().sum().item())
    np.testing.assert_allclose(run("gradnorm", data)[:10], norms, rtol=1e-5)


@pytest.mark.parametrize("name,params", [(c[0], c[1]) for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_batched_equals_one_shot(name, params, data, monkeypatch):
    """Scoring in pieces, with tiny fitting and scoring blocks, equals scoring at once."""
    whole = run(name, data, **params)
    monkeypatch.setattr(distance, "BLOCK_ROWS", 7)
    monkeypatch.setattr(subspace, "BLOCK_ROWS", 7)
    monkeypatch.setattr(distance, "BANK_BLOCK_ELEMENTS", 50)
    method = POSTPROCESSORS.get(name)(**params)
    method.fit(data["train_out"], data["train_out"])
    out = data["test_out"]
    parts = [Outputs(logits=out.logits[i:i + 13], features=out.features[i:i + 13], fc=out.fc)
             for i in range(0, N_TEST, 13)]
    pieces = torch.cat([method.score(part) for part in parts]).double().numpy()
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())


@pytest.mark.parametrize("name,params", [("mds", {}), ("rmds", {}), ("knn", {"k": 5}), ("vim", {"dim": 6})])
def test_distance_methods_score_the_unshifted_half_higher(name, params, data):
    scores = run(name, data, **params)
    assert scores[: N_TEST // 2].mean() > scores[N_TEST // 2:].mean()


def test_vim_refuses_a_dimension_at_or_above_the_feature_dimension(data):
    for dim in (DIM, DIM + 1):
        with pytest.raises(InvalidHyperparameter, match=f"below the feature dimension {DIM}"):
            POSTPROCESSORS.get("vim")(dim=dim).fit(data["train_out"], data["train_out"])
    assert issubclass(InvalidHyperparameter, OodbenchError)
    with pytest.raises(OodbenchError, match="dim=0 is not allowed; dim must be 'auto' or an integer >= 1"):
        POSTPROCESSORS.get("vim")(dim=0)


def test_vim_auto_dimension_is_256_or_half_the_features(data):
    from oodbench.postprocessors.subspace import subspace_dim

    assert subspace_dim("auto", 512) == 256 and subspace_dim("auto", 2048) == 256
    assert subspace_dim("auto", 128) == 64
    np.testing.assert_allclose(run("vim", data), ref_vim(data, DIM // 2), rtol=2e-5, atol=1e-4)


def test_knn_refuses_k_beyond_the_bank(data):
    method = POSTPROCESSORS.get("knn")(k=N_TRAIN + 1)
    method.fit(data["train_out"], data["train_out"])
    with pytest.raises(InvalidHyperparameter, match=f"the {N_TRAIN} fit samples"):
        method.score(data["test_out"])


def test_bad_percentile_and_variant_are_readable_errors(data):
    with pytest.raises(OodbenchError, match="variant='x' is not allowed; variant must be one of 'b', 'p', 's'"):
        POSTPROCESSORS.get("ash")(variant="x")
    with pytest.raises(InvalidHyperparameter, match="keeps 0 of 24"):  # 24 - round(24 * 0.99)
        POSTPROCESSORS.get("scale")(percentile=99).score(data["test_out"])
    with pytest.raises(OodbenchError, match="percentile=100 is not allowed; percentile must be a number in \\[0, 100\\)"):
        POSTPROCESSORS.get("scale")(percentile=100)
    with pytest.raises(OodbenchError, match="percentile=101 is not allowed; percentile must be a number in \\[0, 100\\]"):
        POSTPROCESSORS.get("react")(percentile=101)


def test_all_zero_feature_keeps_a_finite_score(data):
    out = data["test_out"]
    zero = Outputs(logits=out.fc[1][None].clone(), features=torch.zeros(1, DIM), fc=out.fc)
    for name, params in (("scale", {}), ("ash", {"variant": "s"})):
        score = POSTPROCESSORS.get(name)(**params).score(zero)
        np.testing.assert_allclose(score.numpy(), [logsumexp(data["b"])], rtol=1e-6)


def test_output_cache_carries_the_classifier(tmp_path):
    """extract() records the model's (W, b); the cache round-trips them with the checksum."""
    from oodbench.datasets.benchmarks import load_benchmark
    from oodbench.datasets.base import load_dataset
    from oodbench.models.adapter import ModelAdapter
    from oodbench.models.digits import DigitsCNN

    torch.manual_seed(0)
    model = ModelAdapter(DigitsCNN(), num_classes=6, identity="untrained-digits-cnn")
    benchmark = load_benchmark("digits")
    dataset = load_dataset(benchmark.ood_val["gaussian"], tmp_path, benchmark.image, ood=True)
    outputs = extract(model, dataset, batch_size=64)
    weight, bias = model.fc
    assert torch.equal(outputs.fc[0], weight) and torch.equal(outputs.fc[1], bias)
    np.testing.assert_allclose(outputs.logits, outputs.features @ weight.T + bias, atol=1e-4)
    cache = OutputCache(tmp_path)
    cache.save("ab" * 16, outputs)
    loaded = cache.load("ab" * 16)
    assert torch.equal(loaded.fc[0], weight) and torch.equal(loaded.fc[1], bias)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(2)
    from oodbench.postprocessors.base import Outputs
    from oodbench.registry import POSTPROCESSORS

    n_train, n_test, dim = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    gen = torch.Generator().manual_seed(0)
    fc = (torch.randn(10, dim, generator=gen), torch.randn(10, generator=gen))
    train = Outputs(logits=torch.randn(n_train, 10, generator=gen), features=torch.rand(n_train, dim, generator=gen),
                    labels=torch.randint(0, 10, (n_train,), generator=gen), fc=fc)
    test = Outputs(logits=torch.randn(n_test, 10, generator=gen), features=torch.rand(n_test, dim, generator=gen), fc=fc)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.time()
    for name in sys.argv[4].split(","):
        method = POSTPROCESSORS.get(name)()
        method.fit(train, train)
        scores = method.score(test)
        assert scores.shape == (n_test,) and bool(torch.isfinite(scores).all())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "seconds": time.time() - start}))
""")


def test_scoring_50k_train_against_100k_test_stays_under_4_gib():
    """Full-size train bank (50,000 x 512) fitted for knn, mds, vim and react, scored on 2,000
    test rows in a fresh process. Scoring streams fixed-size blocks of test rows, so the only
    part of the peak that grows with the test count is the test features themselves and their
    scores: the 100,000-row peak is at most this peak + 98,000 x (512 + 10 + 1) x 4 bytes."""
    n_train, n_test, dim = 50_000, 2_000, 512
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n_train), str(n_test), str(dim),
                           "knn,mds,vim,react"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    extrapolated = report["peak"] + (100_000 - n_test) * (dim + 10 + 1) * 4
    assert extrapolated < 4 * 2**30, report
    # the working set beyond the inputs is bounded by the blocks, not by N_train x N_test
    assert report["peak"] - report["base"] < 1.5 * 2**30, report
