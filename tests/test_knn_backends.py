"""KNN's two exact searches: blocks of torch matrix products (always there) and faiss
(an optional extra, installed by the test extra so that the equality is always checked):
the same distances on a small bank, the torch path bit for bit as before, and the search
in use named in the cell's key."""

import numpy as np
import pytest
import torch

from oodbench.identity import code_digest
from oodbench.postprocessors import approximate, distance
from oodbench.postprocessors.base import Outputs
from oodbench.registry import POSTPROCESSORS

KS = [1, 3, 17, 50]


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, dim))).float()
    return torch.nn.functional.normalize(x, dim=1)


def numpy_kth(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest Euclidean distance from each query to the bank, in float64."""
    squared = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    return np.sqrt(np.sort(squared, axis=1)[:, k - 1])


def test_torch_search_is_the_formula_and_unchanged(monkeypatch):
    queries, bank = unit(40, 16, 0), unit(300, 16, 1)
    monkeypatch.setattr(distance, "BANK_BLOCK_ELEMENTS", 7 * 300)  # 7 test rows per block
    got = distance.kth_nearest_distances(queries, bank, KS, backend="torch")
    for column, k in enumerate(KS):
        np.testing.assert_allclose(got[:, column].numpy(), numpy_kth(queries.numpy(), bank.numpy(), k), atol=2e-6)
        # the scores of the torch path, bit for bit: its earlier formula on the same 7-row blocks
        # (a matrix product's last bits may depend on its shape and the thread count)
        before = torch.cat([(2 - 2 * (block @ bank.T).topk(k, dim=1).values[:, k - 1]).clamp_min(0).sqrt()
                            for block in queries.split(7)])
        assert torch.equal(got[:, column], before)


def test_faiss_search_gives_the_same_distances_as_torch(monkeypatch):
    pytest.importorskip("faiss", reason="faiss is an optional extra (pip install 'oodbench[faiss]')")
    queries, bank = unit(45, 16, 2), unit(500, 16, 3)
    exact = distance.kth_nearest_distances(queries, bank, KS, backend="torch")
    monkeypatch.setattr(distance, "BANK_BLOCK_ELEMENTS", 4 * max(KS))  # 4 test rows per faiss call
    fast = distance.kth_nearest_distances(queries, bank, KS, backend="faiss")
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("queries, rows, count", [(5, 300, 300), (19, 300, 40), (20, 300, 300), (600, 1030, 200),
                                                    (50, 1, 1), (30, 400, 10)])
def test_faiss_largest_is_faiss_knn_bit_for_bit(queries, rows, count):
    """Every pair sorted (a large count: faiss's range search) or faiss.knn (a small one, or a
    NaN): the same float32 values as faiss.knn, under 20 queries (faiss's loop), over several
    of its BLAS blocks of 1,024 bank rows, and for one bank row."""
    faiss = pytest.importorskip("faiss", reason="faiss is an optional extra (pip install 'oodbench[faiss]')")
    rng = np.random.default_rng(queries + rows)
    q = rng.standard_normal((queries, 24)).astype(np.float32)
    bank = rng.standard_normal((rows, 24)).astype(np.float32)
    expected = faiss.knn(q, bank, count, metric=faiss.METRIC_INNER_PRODUCT)[0]
    assert torch.equal(distance.faiss_largest(faiss, q, bank, count), torch.from_numpy(expected))
    q[0, 3] = np.nan
    expected = faiss.knn(q, bank, count, metric=faiss.METRIC_INNER_PRODUCT)[0]
    np.testing.assert_array_equal(distance.faiss_largest(faiss, q, bank, count).numpy(), expected)


def test_knn_uses_faiss_when_installed_and_its_key_says_which(monkeypatch):
    installed = distance.knn_backend()
    try:
        import faiss  # noqa: F401
        assert installed == "faiss"
    except ImportError:
        assert installed == "torch"
    knn = POSTPROCESSORS.get("knn")
    train = Outputs(logits=torch.zeros(200, 3), features=unit(200, 8, 4) * 3, labels=torch.zeros(200, dtype=torch.long))
    test = Outputs(logits=torch.zeros(30, 3), features=unit(30, 8, 5))
    scores = {}
    keys = {}
    for backend in ("torch", "faiss") if installed == "faiss" else ("torch",):
        monkeypatch.setattr(distance, "knn_backend", lambda backend=backend: backend)
        method = knn(k=5)
        method.fit(train, train)
        scores[backend] = method.score(test)
        keys[backend] = code_digest(knn)
    assert len(set(keys.values())) == len(keys)  # a cell computed one way is not reused for the other
    if len(scores) == 2:
        torch.testing.assert_close(scores["faiss"], scores["torch"], rtol=0, atol=1e-6)


def clustered(rows: int, seed: int, clusters: int = 12, dim: int = 24) -> torch.Tensor:
    """Non-negative features around `clusters` centres (the same for every seed), as ReLU features are."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).gamma(1.0, 1.0, (clusters, dim))
    x = centres[rng.integers(0, clusters, rows)] + rng.normal(0, 0.35, (rows, dim))
    return torch.from_numpy(np.maximum(x, 0)).float()


def test_knn_ivf_index_finds_the_nearest_rows_and_is_keyed_apart(tmp_path):
    """``index: ivf`` (approximate): its own fit key and cell settings, its similarities exact
    (a distance can only grow when a neighbour is missed), recall@20 high on a clustered bank;
    its fit state (the lists, not the bank) goes through the fit-state cache."""
    pytest.importorskip("faiss", reason="faiss is an optional extra (pip install 'oodbench[faiss]')")
    from oodbench.storage.caches import FitStateCache
    from oodbench.benchmark.fitting import fit_cached
    from oodbench.identity import fit_key_text

    k, knn = 20, POSTPROCESSORS.get("knn")
    bank, queries = clustered(4000, 1), clustered(300, 2)
    train = Outputs(logits=torch.zeros(4000, 3), features=bank, labels=torch.zeros(4000, dtype=torch.long))
    test = Outputs(logits=torch.zeros(300, 3), features=queries)
    flat, ivf = knn(k=k), knn(k=k, index="ivf")
    assert flat.params["index"] == "flat" and fit_key_text(flat, ["f"]) != fit_key_text(ivf, ["f"])
    cache = FitStateCache(tmp_path)
    for method in (flat, ivf):
        fit_cached(method, train, train, cache, ["fit-key"])
    exact, nearest = -flat.score(test).double(), -ivf.score(test).double()
    assert (nearest >= exact - 1e-6).all()  # only missed neighbours: never nearer than the exact K-th
    similarity = (distance.l2_normalise(queries) @ distance.l2_normalise(bank).T).double()
    kth = similarity.topk(k, dim=1).values[:, -1:]
    found = approximate.ivf_best_similarities(queries, bank, (ivf.ivf_centroids, ivf.ivf_order, ivf.ivf_offsets), k,
                                           distance.l2_normalise).double()
    recall = (found >= kth - 1e-6).float().mean().item()
    assert recall >= 0.97, recall
    assert len(ivf.ivf_centroids) == int(4000 ** 0.5) and sorted(ivf.ivf_order.tolist()) == list(range(4000))
    state = cache.load(FitStateCache.key(ivf, ["fit-key"]))
    assert "bank" not in state and torch.equal(state["ivf_order"], ivf.ivf_order)
    again = knn(k=k, index="ivf")
    fit_cached(again, train, train, cache, ["fit-key"])
    assert torch.equal(again.score(test), ivf.score(test))


def test_knn_ivf_without_faiss_fails_in_one_line(monkeypatch):
    from oodbench.errors import OodbenchError

    real = approximate.importlib.util.find_spec
    monkeypatch.setattr(approximate.importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else
                        real(name, *a))
    needs = r"^knn: index 'ivf' needs faiss \(pip install 'oodbench\[faiss\]'\)"
    with pytest.raises(OodbenchError, match=needs) as error:
        POSTPROCESSORS.get("knn")(index="ivf")
    assert "\n" not in str(error.value)
    assert POSTPROCESSORS.get("knn")(index="flat").params["index"] == "flat"  # the exact search needs nothing
