"""The notebook entry points: a live model and in-memory data in, tables out.

Every function runs the harness of `oodbench run` on the data it is given
(`oodbench.api.session.Session`): the same extraction and output cache (keyed by the
module's weights and class code and a content hash of the images), fit-state cache,
validation search, metrics and results store. Data forms: see `oodbench.api.reading`
(DataLoader, Dataset, ``(images, labels)`` or an images tensor; images in [0,1]).
Reading options (``normalization``, ``output``, ``extras``, ``classifier``,
``outputs_probabilities``): see `oodbench.api.models.Model`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from oodbench.api.models import Model, as_models
from oodbench.api.session import Session
from oodbench.errors import OodbenchError


def evaluate(model: Any, id_test: Any, ood: Any, postprocessors: Sequence[str] | str = ("msp",), *,
             fit: Any = None, val: Any = None, ood_val: Any = None, search: bool = True,
             groups: Mapping[str, Sequence[str]] | None = None, fpr: str = "classic", store: str | None = None,
             cache_dir: str | None = None, device: str | None = None, limit: int | None = None,
             params: Mapping[str, Mapping[str, Any]] | None = None, plugins: Sequence[str] = (),
             normalization: Any = None, output: Any = None, extras: Mapping[str, Any] | None = None,
             classifier: Any = None, outputs_probabilities: bool = False, batch_size: int = 256,
             benchmark: str = "python", progress: bool = False) -> pd.DataFrame:
    """The leaderboard of `postprocessors` on `model`: FPR@95 and AUROC per OOD set, the near-
    and far-OOD averages, ID accuracy; one row per (model, postprocessor), as `oodbench run`.

    `model`: an ``nn.Module`` taking [0,1] images (give ``normalization=(mean, std)`` when it
    expects normalised ones), an `oodbench.Model`, or ``{name: model}`` for several. A model
    with one output logit z is a binary classifier, read as the two-class logits [0, z].
    `id_test`, `val`, `fit`: ID images with labels (class indices); `ood`, `ood_val`:
    ``{name: images}`` (or one data object). Feature-based methods fit on `fit` (ID training
    data), else on `val`; the hyperparameters are searched (best AUROC of `val` against the
    pooled `ood_val` sets) when `search` and both are given, else defaults or `params`
    (``{method: {hyperparameter: value}}``) are used. `groups`: ``{"near": [...], "far":
    [...]}`` names of `ood` (default: every set is far). `fpr`: ``classic`` (ID positive) or
    ``openood`` for the FPR columns. `store`: a results SQLite file to write (default: a
    temporary one); `cache_dir`: the output cache (default ``OODBENCH_CACHE`` or
    ``.oodbench_cache``); `device`: default the model's; `limit`: at most that many images
    per split (a seeded stratified subset, as ``--limit``); `plugins`: postprocessor files.

    Returns the DataFrame of `oodbench.benchmark.leaderboard.leaderboard_frame` (FPR and AUROC as
    fractions in [0, 1]). Raises `OodbenchError` in one line for bad input.
    """
    models = as_models(model, normalization=normalization, output=output, extras=extras, classifier=classifier,
                       outputs_probabilities=outputs_probabilities)
    with Session(models, id_test, ood, postprocessors=postprocessors, fit=fit, val=val, ood_val=ood_val,
                 search=search, groups=groups, fpr=fpr, store=store, cache_dir=cache_dir, device=device,
                 limit=limit, params=params, plugins=plugins, batch_size=batch_size, benchmark=benchmark) as session:
        return session.run(progress)


def calibration(model: Any, id_test: Any, ood: Any, *, groups: Mapping[str, Sequence[str]] | None = None,
                levels: Sequence[float] | None = None, seed: int = 0, cache_dir: str | None = None,
                device: str | None = None, limit: int | None = None, normalization: Any = None, output: Any = None,
                outputs_probabilities: bool = False, batch_size: int = 256) -> pd.DataFrame:
    """Calibration under logit noise (`oodbench.tasks.calibration`): per model and noise
    level s (default ``linspace(0, 2, 10)``), accuracy, ECE (15 bins), NLL (nats) and the MSP
    AUROC per OOD group, with N(0, (s * std(logits))^2) noise added to each split's logits.
    `model` as in `evaluate` (``{name: model}`` compares several, e.g. a softmax baseline)."""
    from oodbench.tasks.calibration import experiment_calibration

    models = as_models(model, normalization=normalization, output=output,
                       outputs_probabilities=outputs_probabilities)
    with Session(models, id_test, ood, postprocessors=["msp"], search=False, groups=groups, cache_dir=cache_dir,
                 device=device, limit=limit, batch_size=batch_size) as session:
        session.run()
        return experiment_calibration(session.experiment(), levels, seed)


def operating_point(model: Any, id_test: Any, ood: Any, postprocessor: str = "msp", *, val: Any,
                    fit: Any = None, ood_val: Any = None, search: bool = True,
                    heads: Sequence[Any] | Mapping[str, Any] | None = None, keep: float = 0.95,
                    tau: float | Mapping[str, float] | None = None,
                    holdout_classes: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                    groups: Mapping[str, Sequence[str]] | None = None, params: Mapping[str, Any] | None = None,
                    cache_dir: str | None = None, device: str | None = None, limit: int | None = None,
                    normalization: Any = None, extras: Mapping[str, Any] | None = None,
                    batch_size: int = 256) -> pd.DataFrame:
    """What a deployed detector does at one threshold, per head: one row per head with tau,
    ``id_accepted`` (share of ID test kept), ``accuracy_accepted`` (top-1 accuracy on the
    accepted ID images), ``ood_rejected`` (share of all OOD images rejected), and, with
    `holdout_classes`, ``seen_accuracy`` (share of the other ID test images accepted with
    the right class) and ``unseen_accuracy`` (share of held-out images rejected as novel).

    tau keeps a share `keep` of the ID validation scores, or is given (one value, or
    ``{head: tau}``). `heads`: the model's named outputs (``["super", "sub"]`` or
    ``{name: selector}``); default one head, the whole output. Labels may be given per
    head (``(images, {"super": y1, "sub": y2})``); `holdout_classes` (a list for every head,
    or ``{head: [...]}``) are ID classes held out as pseudo-novel: their test images should
    be rejected, and they are removed from `fit` and `val`. The full report of each head
    (per OOD set, precision / recall) is in ``frame.attrs["reports"]``.
    """
    from oodbench.tasks.operating_point import model_operating_point, summary_frame

    (base,) = as_models(model, normalization=normalization, extras=extras)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise OodbenchError(f"keep must be a share in (0, 1], got {keep!r}")
    if heads is None:
        selectors: dict[str | None, Any] = {None: None}
    elif isinstance(heads, Mapping):
        selectors = {str(name): selector for name, selector in heads.items()}
    else:
        selectors = {str(selector): selector for selector in heads}
    reports = []
    for head, selector in selectors.items():
        head_model = Model(base.net, name=base.label if head is None else f"{base.label}[{head}]",
                           normalization=base.normalization, output=selector, extras=base.extras)
        held = _per_head(holdout_classes, head, "holdout_classes") or []
        with Session([head_model], id_test, ood, postprocessors=[postprocessor], fit=fit, val=val,
                     ood_val=ood_val, search=search, groups=groups, params={postprocessor: params} if params else None,
                     cache_dir=cache_dir, device=device, limit=limit, batch_size=batch_size, head=head,
                     holdout_classes=held) as session:
            session.run()
            experiment = session.experiment(extract=["id:val", "id:test"])
            reports.append(model_operating_point(experiment, experiment.config.models[0], postprocessor,
                                                 _per_head(tau, head, "tau"), keep, held))
    frame = summary_frame(reports)
    frame.attrs["reports"] = reports
    return frame


def _per_head(value: Any, head: str | None, what: str) -> Any:
    if not isinstance(value, Mapping):
        return value
    if head not in value:
        raise OodbenchError(f"{what} is given per head ({', '.join(map(str, value))}) but not for head '{head}'")
    return value[head]
