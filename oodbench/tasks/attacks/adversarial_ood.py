"""Attacked ID images as one more OOD set (OpenOOD's adversarial-OOD setting, its PR #275).

The ID test images are attacked **against the classifier** (untargeted: the cross-entropy
of the true label is ascended) with FGSM, PGD or AutoAttack's APGD-CE inside the eps-ball
of the `AttackSpec` (norm, steps, restarts, step size as there); every method then scores
them with its real score, as an OOD set named ``adv-<kind>@<eps>`` against the clean ID
test set. The attack success rate is the share of correctly classified ID test images that
the attack makes misclassified; it goes in the rows (``success_rate``) and the caption.
The adversarial images are cached like the detector attacks (`AttackCache`), keyed by the
split, the model, the threat model and the budget.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from oodbench.tasks.attacks.evaluate import ID_TEST, ROW_COLUMNS, AttackCache, metric_rows, split_images
from oodbench.tasks.attacks.objectives import method_scores
from oodbench.tasks.attacks.pgd import autoattack_module, fgsm, pgd
from oodbench.tasks.attacks.spec import AttackSpec, eps_label
from oodbench.identity import key_text

KINDS = ("fgsm", "pgd", "apgd")


def classifier_attack(kind: str, spec: AttackSpec, model, x: torch.Tensor, labels: torch.Tensor,
                      indices: torch.Tensor, eps: float) -> torch.Tensor:
    """Untargeted adversarial examples of the batch `x` against the model's prediction of `labels`."""
    loss = lambda v: F.cross_entropy(model(v), labels, reduction="none")  # noqa: E731
    if kind == "fgsm":
        return fgsm(loss, x, eps)
    if kind == "pgd":
        return pgd(loss, x, eps, norm=spec.norm, steps=spec.steps, step_fraction=spec.step_fraction,
                   restarts=spec.restarts, schedule=spec.schedule, seed=spec.seed, indices=indices)
    if eps == 0:
        return x.clone()
    attack = autoattack_module().APGDAttack(model, n_iter=spec.steps, norm={"linf": "Linf", "l2": "L2"}[spec.norm],
                                            n_restarts=spec.restarts, eps=eps, seed=spec.seed, loss="ce",
                                            device=x.device)
    with torch.enable_grad():
        return attack.perturb(x, labels).detach().clamp(0, 1)


def adversarial_set(kind: str, spec: AttackSpec, experiment, model_spec, model, eps: float,
                    cache: AttackCache) -> tuple[torch.Tensor, float]:
    """(the attacked ID test images, the attack success rate), from the cache when there."""
    key = key_text({"kind": "adversarial-id", "outputs": experiment.key(model_spec, ID_TEST), "attack": kind,
                    "spec": spec.fingerprint_payload(), "eps": float(eps)})
    entry = cache.read(key)
    if entry is not None:
        return entry[0]["images"], float(entry[1]["success_rate"])
    outputs = experiment.outputs(model_spec, ID_TEST, with_model=True)
    labels = outputs.labels.long()
    device = next(iter(model.parameters()), torch.empty(0)).device
    images, fooled, correct = [], 0, 0
    for x, indices in split_images(outputs):
        y = labels[indices].to(device)
        adversarial = classifier_attack(kind, spec, model, x.to(device), y, indices, eps).detach()
        with torch.no_grad():
            right = model(x.to(device)).argmax(1) == y
            fooled += int((right & (model(adversarial).argmax(1) != y)).sum())
        correct += int(right.sum())
        images.append(adversarial.cpu())
    rate = fooled / max(correct, 1)
    images_t = torch.cat(images)
    cache.write(key, {"images": images_t, "scores": torch.empty(0)}, {"success_rate": rate})
    return images_t, rate


def adversarial_ood(experiment, spec: AttackSpec, kinds: list[str], methods: list[str] | None = None,
                    models: list[str] | None = None, quiet: bool = False) -> pd.DataFrame:
    """Rows (`ROW_COLUMNS` and ``success_rate``) of every method against each adversarial ID set,
    with ``attack`` = ``adv-id:<kind>-<norm>``; the clean ID test set is the ID side."""
    names = methods or list(experiment.plan.methods)
    specs = [s for s in experiment.config.models if not models or s.display in models]
    cache, rows = AttackCache(experiment.config.cache_dir), []
    budgets = [e for e in spec.eps if e > 0]
    progress = tqdm(total=len(specs) * len(kinds) * len(budgets), desc="adversarial ID", disable=quiet)
    for model_spec in specs:
        model = experiment.model(model_spec).eval()
        sets = {}
        for kind in kinds:
            for eps in budgets:
                sets[(kind, eps)] = adversarial_set(kind, spec, experiment, model_spec, model, eps, cache)
                progress.update()
        for name in names:
            method = experiment.fitted(model_spec, name)
            clean = experiment.scores(method, model_spec, ID_TEST)
            for (kind, eps), (images, rate) in sets.items():
                scores = torch.cat([method_scores(method, model, images[i: i + 256].to(experiment.device))
                                    for i in range(0, len(images), 256)]).numpy()
                base = {"model": model_spec.model_label, "checkpoint": model_spec.member or "",
                        "tags": ",".join(model_spec.tags), "postprocessor": name, "params": str(method.params),
                        "attack": f"adv-id:{kind}-{spec.norm}", "eps": float(eps), "gradient": "classifier CE"}
                for row in metric_rows(base, clean, {f"adv-{kind}@{eps_label(eps)}": ("adversarial", scores)}):
                    rows.append({**row, "success_rate": rate})
    progress.close()
    return pd.DataFrame(rows, columns=ROW_COLUMNS + ["success_rate"])
