"""The built-in offline benchmark: its splits and its two models."""

from __future__ import annotations

import numpy as np
import torch

from oodbench.datasets.benchmarks import load_benchmark
from oodbench.datasets.base import dataset_labels, load_dataset
from oodbench.datasets.parts import stratified_parts
from oodbench.models import digits


def test_stratified_parts_are_disjoint_proportional_and_seeded():
    labels = np.repeat(np.arange(5), [100, 80, 60, 40, 20])
    parts = stratified_parts(labels, {"train": 0.6, "val": 0.2, "test": "rest"}, seed=3)
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything) == list(range(labels.size))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [180, 60, 60]
    for name, share in (("train", 0.6), ("val", 0.2)):
        np.testing.assert_allclose(np.bincount(labels[parts[name]], minlength=5), share * np.bincount(labels), atol=1)
    again = stratified_parts(labels, {"train": 0.6, "val": 0.2, "test": "rest"}, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = stratified_parts(labels, {"train": 0.6, "val": 0.2, "test": "rest"}, seed=4)
    assert not np.array_equal(parts["train"], other["train"])
    counts = stratified_parts(labels, {"val": 30}, seed=0)
    assert len(counts["val"]) == 30


def test_digits_benchmark_splits(tmp_path):
    bench = load_benchmark("digits")
    assert list(bench.near) == ["digits_6_9"] and list(bench.far) == ["textures", "gaussian", "uniform"]
    sizes = {}
    for name, ref in {**{f"id:{k}": v for k, v in bench.id_splits.items()}, **bench.ood_test}.items():
        dataset = load_dataset(ref, tmp_path, bench.image, ood=not name.startswith("id:"))
        image, label = dataset[0]
        assert image.shape == (1, 8, 8) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert (label == -1) == (not name.startswith("id:"))
        sizes[name] = len(dataset)
    assert sizes["id:train"] + sizes["id:val"] + sizes["id:test"] == 1083  # digits 0-5 in scikit-learn
    assert sizes["digits_6_9"] == round(0.8 * 714)
    train = load_dataset(bench.id_splits["train"], tmp_path, bench.image)
    assert set(dataset_labels(train.base.base)) == set(range(6))


def test_builtin_models_are_accurate(digits_models, tmp_path):
    bench = load_benchmark("digits")
    test = load_dataset(bench.id_splits["test"], tmp_path, bench.image)
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    for name, model in digits_models.items():
        with torch.no_grad():
            accuracy = (model(images).argmax(1) == labels).float().mean().item()
        assert accuracy >= 0.95, f"{name}: ID test accuracy {accuracy:.3f}"
        features, logits = model.features(images)
        weight, bias = model.fc
        torch.testing.assert_close(features @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic(digits_models, tmp_path):
    from oodbench.models.adapter import state_dict_hash
    from oodbench.models.adapter import ModelContext

    images, labels, _ = digits._training_data(ModelContext(tmp_path, tmp_path))
    retrained = digits.train("digits-cnn", images, labels)
    assert state_dict_hash(retrained.state_dict()) == state_dict_hash(digits_models["digits-cnn"].net.state_dict())


def test_robust_model_resists_pgd_better(digits_models, tmp_path):
    bench = load_benchmark("digits")
    test = load_dataset(bench.id_splits["test"], tmp_path, bench.image)
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    robust_accuracy = {}
    for name, model in digits_models.items():
        # a stronger attack than the training one (eps 0.1), where the standard model breaks
        attacked = digits.pgd_linf(model, images, labels, eps=0.2, step=0.05, steps=20,
                                   generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust_accuracy[name] = (model(attacked).argmax(1) == labels).float().mean().item()
    assert robust_accuracy["digits-cnn-robust"] > robust_accuracy["digits-cnn"] + 0.15
