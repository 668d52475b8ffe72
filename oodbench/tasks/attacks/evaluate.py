"""Detectors under attack: clean vs attacked AUROC / FPR@95 per model, method, OOD set and eps.

For every model of a finished run (its cached outputs and fitted postprocessors, read back
through `CachedExperiment`), every method and every budget of the `AttackSpec`:

- *out*: each OOD test image is moved inside its eps-ball to **raise** the method's score;
- *in*: each ID test image is moved to **lower** it;
- *both*: both at once, the worst case for AUROC and FPR@95.

The loss is the method's own score (`oodbench.tasks.attacks.objectives`). The attacked images'
scores are the values PGD computed of them when its loss is the method's score (its exact
forms, which the tests check against the method's own path), saving a forward pass; the
images of a surrogate attack, FGSM and APGD are scored with the method's real score. An
attacker may also leave an image as it is, so each image keeps the worse of its clean and
attacked scores: an attack never helps the detector, and eps = 0 gives the clean numbers. The attacked images and their scores are
cached per (model, split, method, threat model, eps, direction) under ``<cache>/attacks``
(`AttackCache`, keys from `oodbench.identity.attack_key_text`, verified on read), so a rerun
resumes where it stopped.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from oodbench.tasks.attacks.objectives import SURROGATE, DetectorObjective, detector_objective, energy, method_scores
from oodbench.tasks.attacks.pgd import apgd, fgsm, pgd_with_values
from oodbench.tasks.attacks.spec import AttackSpec
from oodbench.storage.files import VerifiedFiles
from oodbench.metrics.detection import ood_metrics
from oodbench.identity import attack_key_text
from oodbench.postprocessors.base import InvalidHyperparameter

CLEAN = "none"
ID_TEST = "id:test"
ROW_COLUMNS = ["model", "checkpoint", "tags", "postprocessor", "params", "attack", "eps", "gradient", "dataset",
               "group", "metric", "value"]


class AttackCache(VerifiedFiles):
    """Attacked images (``images``) and the method's scores of them (``scores``) per split."""

    kind = "attacks"
    what = "attack cache entry"


def split_images(outputs) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, their indices in the split) batch by batch, in the split's order."""
    loader = DataLoader(outputs.inputs, batch_size=int(outputs.meta.get("batch_size", 256)), shuffle=False,
                        num_workers=int(outputs.meta.get("num_workers", 0)))
    start = 0
    for images, _ in loader:
        yield images, torch.arange(start, start + len(images))
        start += len(images)


def perturb(spec: AttackSpec, objective: DetectorObjective, model, x: torch.Tensor, indices: torch.Tensor,
            eps: float, sign: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images of the batch `x` moved to maximise ``sign * score`` inside the eps-ball, and
    ``sign * score`` of each when the attack computed it (PGD), else None."""
    goal = lambda v: sign * objective.score(v)  # noqa: E731
    ebo = energy(model)
    fallback = None if objective.gradient == SURROGATE else (lambda v: sign * ebo(v))
    if spec.kind == "fgsm":
        return fgsm(goal, x, eps, fallback=fallback), None
    if spec.kind == "apgd":
        return apgd(goal, x, eps, norm=spec.norm, steps=spec.steps, restarts=spec.restarts, seed=spec.seed), None
    return pgd_with_values(goal, x, eps, norm=spec.norm, steps=spec.steps, step_fraction=spec.step_fraction,
                           restarts=spec.restarts, schedule=spec.schedule, seed=spec.seed, indices=indices,
                           fallback=fallback)


def attacked_scores(spec: AttackSpec, method, objective: DetectorObjective, model, outputs, eps: float,
                    sign: float, cache: AttackCache, key: str) -> np.ndarray:
    """The method's scores of the split's attacked images (from the cache when there)."""
    entry = cache.read(key)
    if entry is not None:
        return entry[0]["scores"].numpy()
    device = next(iter(model.parameters()), torch.empty(0)).device
    images, scores = [], []
    for x, indices in split_images(outputs):
        adversarial, values = perturb(spec, objective, model, x.to(device), indices, eps, sign)
        images.append(adversarial.detach().cpu())
        if values is not None and objective.gradient != SURROGATE:  # the attack's values are the method's scores
            scores.append((sign * values).cpu())
        else:
            scores.append(method_scores(method, model, adversarial.detach()))
    images_t = torch.cat(images) if images else torch.empty(0)
    scores_t = torch.cat(scores) if scores else torch.empty(0, dtype=torch.float64)
    cache.write(key, {"images": images_t, "scores": scores_t}, {"eps": eps, "sign": sign})
    return scores_t.numpy()


def metric_rows(base: dict, id_scores: np.ndarray, ood: dict[str, tuple[str, np.ndarray]]) -> list[dict]:
    """One row per (OOD set, metric), and the near-OOD / far-OOD / average means."""
    rows, per_set = [], {}
    for dataset, (group, scores) in ood.items():
        per_set[dataset] = (group, ood_metrics(id_scores, scores))
        rows += [{**base, "dataset": dataset, "group": group, "metric": m, "value": v}
                 for m, v in per_set[dataset][1].items()]
    for group, label in (("near", "near-OOD"), ("far", "far-OOD"), ("all", "average")):
        members = [values for g, values in per_set.values() if group == "all" or g == group]
        if members:
            rows += [{**base, "dataset": label, "group": "mean", "metric": m,
                      "value": float(np.mean([values[m] for values in members]))} for m in members[0]]
    return rows


def attack_experiment(experiment, spec: AttackSpec, methods: list[str] | None = None,
                      models: list[str] | None = None, quiet: bool = False,
                      sink: Callable[[list[dict]], None] | None = None) -> pd.DataFrame:
    """Clean and attacked metrics of every (model, method, OOD set, eps) as long rows
    (`ROW_COLUMNS`); ``attack`` is ``none`` on the clean rows, else ``<kind>-<norm>/<target>``.
    `sink`, when given, receives each block of rows as it is finished (the clean rows of a
    (model, method), then those of each eps), so a caller can store them before the next starts."""
    sink = sink or (lambda block: None)
    names = methods or list(experiment.plan.methods)
    specs = [s for s in experiment.config.models if not models or s.display in models]
    cache, label = AttackCache(experiment.config.cache_dir), f"{spec.kind}-{spec.norm}/{spec.target}"
    rows: list[dict] = []
    progress = tqdm(total=len(specs) * len(names) * len(spec.eps), desc="attack", unit="cell", disable=quiet)
    for model_spec in specs:
        model = experiment.model(model_spec).eval()
        groups = {ID_TEST: "id", **experiment.ood_tests(model_spec)}
        for name in names:
            method = experiment.fitted(model_spec, name)
            outputs = {split: experiment.outputs(model_spec, split, with_model=True) for split in groups}
            clean = {split: experiment.scores(method, model_spec, split) for split in groups}
            base = {"model": model_spec.model_label, "checkpoint": model_spec.member or "",
                    "tags": ",".join(model_spec.tags), "postprocessor": name, "params": str(method.params)}
            ood = {s.split(":", 1)[1]: (g, clean[s]) for s, g in groups.items() if s != ID_TEST}
            block = metric_rows({**base, "attack": CLEAN, "eps": 0.0, "gradient": ""}, clean[ID_TEST], ood)
            sink(block)
            rows += block
            sample = next(iter(split_images(outputs[ID_TEST])))[0]
            try:
                objective = detector_objective(method, model, sample.to(experiment.device))
            except InvalidHyperparameter:
                progress.update(len(spec.eps))
                continue
            fit_keys = experiment.fit_keys(model_spec, name)
            for eps in spec.eps:
                attacked = {}
                for split in groups:
                    lower = split == ID_TEST
                    if spec.target == ("out" if lower else "in"):
                        attacked[split] = clean[split]
                        continue
                    key = attack_key_text(method, fit_keys, experiment.key(model_spec, split),
                                          spec.fingerprint_payload(), eps, "lower" if lower else "raise")
                    scores = attacked_scores(spec, method, objective, model, outputs[split], eps,
                                             -1.0 if lower else 1.0, cache, key)
                    attacked[split] = np.minimum(clean[split], scores) if lower else np.maximum(clean[split], scores)
                ood = {s.split(":", 1)[1]: (g, attacked[s]) for s, g in groups.items() if s != ID_TEST}
                block = metric_rows({**base, "attack": label, "eps": float(eps), "gradient": objective.gradient},
                                    attacked[ID_TEST], ood)
                sink(block)
                rows += block
                progress.update()
    progress.close()
    return pd.DataFrame(rows, columns=ROW_COLUMNS)
