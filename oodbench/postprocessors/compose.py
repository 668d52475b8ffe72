"""Shaping x scorer: a feature- or weight-shaping rule applied before any score, named
``<shaper>+<scorer>`` (``react+ebo``, ``ash_s+gen``, ``scale+msp``, ``react+knn``,
``dice+pro_msp``), as OODEEL lets one combine them.

The shaper rewrites the penultimate features z (or the classifier weights W) and the
logits are recomputed from them, f' = W' z' + b, in float64; the scorer then reads these
outputs as if the model had produced them: it is fitted on the shaped fit and validation
splits and scores the shaped test splits. A scorer that runs the model again (the PRO
family) takes every step through the shaping: its logits at an input x are W' shape(z(x)) + b.

Shapers (`SHAPERS`; the formulas of `oodbench.postprocessors.shaping`, where each is also
registered with the energy score as ``react``, ``ash``, ``scale``, ``dice``):

- ``react`` (Sun et al., NeurIPS 2021): z' = min(z, t), t the ``percentile``-th percentile
  of every activation of the fit split;
- ``ash_b``, ``ash_p``, ``ash_s`` (Djurisic et al., ICLR 2023): keep the k = D - round(D p / 100)
  largest activations (``percentile`` p), as ASH-B / -P / -S;
- ``scale`` (Xu et al., ICLR 2024): z' = z exp(sum(z) / sum of the top k of z);
- ``dice`` (Sun & Li, ECCV 2022): W' = W masked where W * mean fit z is at or below its
  ``percentile``-th percentile;
- ``bats`` (Zhu et al., NeurIPS 2022): z clamped per unit to [beta - lam gamma, beta + lam gamma],
  the last BatchNorm's bias and weight (`BATSShaper`; it reads the model's parameters,
  ``needs_weights``); registered with the energy as ``bats``;
- ``optfs`` (Zhao et al., ICLR 2024): the piecewise-constant shaping fitted in closed form
  (`oodbench.postprocessors.optfs`; ``optfs+ebo`` is the paper's energy variant).

The composite takes both parts' hyperparameters (a name both use is refused), searches
both parts' lists (``configs/postprocessors/<shaper>.yaml`` and ``<scorer>.yaml``, each
part's own name), and fits the shaper's state once per value of its hyperparameters.
``gen_react`` is ``react+gen`` and ``pro_gen_react`` is ``react+pro_gen`` (the PRO paper's
code, Chen et al., CVPR 2025), each with its own search lists and convention settings.
Scorers that read auxiliary outputs, intermediate layers or several checkpoints, input
perturbation methods other than PRO, and the shaping methods themselves do not compose.

``odin+<scorer>`` puts ODIN's input perturbation (`Perturbed`) before any score of the
model's outputs (``odin+ebo``, ``odin+knn``): the model runs again on x' and the scorer,
fitted on the clean fit split, scores its logits and features; its T and eps are
``perturb_temperature`` and ``perturb_eps`` (ODIN's search lists), beside the scorer's own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Number, Outputs, Postprocessor, in_blocks
from oodbench.postprocessors.gradient import input_batches
from oodbench.postprocessors.odin import odin_step
from oodbench.postprocessors.shapers import SHAPERS, Shaper
from oodbench.registry import POSTPROCESSORS, register_postprocessor

SEPARATOR = "+"
SHAPING_CODE = ("oodbench.postprocessors.shapers", "oodbench.postprocessors.shaping", "oodbench.postprocessors.optfs")
SHAPED = "shaped"  # outputs.meta key: these outputs are already shaped (by the composite of this id)


class Shaped:
    """Mixed in before the scorer's class: shapes every outputs the scorer reads."""

    shaper: ClassVar[Shaper]
    scorer: ClassVar[type[Postprocessor]]

    def _shaper_params(self) -> dict[str, Any]:
        return {k: self.params[k] for k in self.shaper.defaults}

    def _shaped_logits(self, z: torch.Tensor, fc: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        weight, bias = fc
        weight = self.shaper.weight(weight.to(z.dtype), self.shaper_state)
        return self.shaper.features(z, self.shaper_state, self._shaper_params()) @ weight.T + bias.to(z.dtype)

    def _mark(self) -> tuple:
        """What the shaping of these outputs was: the shaper, its parameters and its fitted state."""
        return self.shaper.name, tuple(sorted(self._shaper_params().items())), id(self.shaper_state)

    def shaped(self, outputs: Outputs) -> Outputs:
        """`outputs` with z' and f' = W' z' + b (float64); unchanged when already shaped this way
        (the default `score_grid` hands shaped outputs to copies of this method). A scorer that
        runs the model reads its shaped logits through `logits`, so its outputs stay as they are."""
        if self.scorer.needs_model:
            return outputs
        if outputs.features is None:
            raise OodbenchError(f"{self.name} needs the penultimate features")
        if outputs.meta.get(SHAPED) == self._mark():
            return outputs
        params = self._shaper_params()
        fc = tuple(t.double() for t in outputs.fc)
        features = in_blocks(lambda z: self.shaper.features(z.double(), self.shaper_state, params), outputs.features)
        logits = in_blocks(lambda z: self._shaped_logits(z.double(), fc), outputs.features)
        return replace(outputs, logits=logits, features=features,
                       fc=(self.shaper.weight(fc[0], self.shaper_state), fc[1]),
                       meta={**outputs.meta, SHAPED: self._mark()})

    def fit(self, train: Outputs, val: Outputs) -> None:
        if train.features is None:
            raise OodbenchError(f"{self.name} needs the penultimate features of the fit split")
        self.shaper_state = self.shaper.fit(train, self._shaper_params())
        if self.scorer.needs_fit:
            super().fit(self.shaped(train), self.shaped(val))

    def score(self, outputs: Outputs) -> torch.Tensor:
        return super().score(self.shaped(outputs))

    def score_grid(self, outputs: Outputs, combos: list[dict[str, Any]]) -> list[torch.Tensor]:
        return super().score_grid(self.shaped(outputs), combos)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An input-gradient scorer's logits: W' shape(z(x)) + b, differentiable."""
        features, _ = model.features(x)
        return self._shaped_logits(features, model.fc)


class Perturbed:
    """Mixed in before an output-based scorer's class: ODIN's input perturbation (Liang et al.,
    ICLR 2018) before the scorer reads the model's outputs. y = argmax f(x),
    x' = x - eps sign(grad_x CE(f(x) / T, y)) (eps in [0,1]-pixel units, sign(0) = +1, as
    `oodbench.postprocessors.odin`), then the scorer scores (f(x'), z(x')); it is fitted on
    the clean fit split. ``perturb_temperature`` and ``perturb_eps`` are T and eps."""

    scorer: ClassVar[type[Postprocessor]]

    def fit(self, train: Outputs, val: Outputs) -> None:
        if self.scorer.needs_fit:
            super().fit(train, val)

    def plain_scorer(self) -> Postprocessor:
        """The scorer alone, with this method's fit state (it scores the perturbed outputs)."""
        scorer = self.scorer(**{k: v for k, v in self.params.items() if k in self.scorer.defaults})
        scorer.load_fit_state(self.fit_state())
        return scorer

    def score(self, outputs: Outputs) -> torch.Tensor:
        model, scorer = outputs.model, self.plain_scorer()
        temperature, eps = float(self.params["perturb_temperature"]), float(self.params["perturb_eps"])
        scores = []
        for x in input_batches(outputs, self.name):
            with torch.enable_grad():
                x0 = x.detach().requires_grad_(True)
                step = odin_step(model(x0), x0, temperature)
            with torch.no_grad():
                features, logits = model.features(x.detach() - eps * step)
            fc = tuple(t.detach().cpu() for t in model.fc)
            scores.append(scorer.score(Outputs(logits=logits.cpu(), features=features.cpu(), fc=fc)))
        return torch.cat(scores) if scores else torch.empty(0)

    def score_grid(self, outputs: Outputs, combos: list[dict[str, Any]]) -> list[torch.Tensor]:
        return Postprocessor.score_grid(self, outputs, combos)  # each combination perturbs anew


PERTURBATION = "odin"  # <PERTURBATION>+<scorer>: ODIN's input perturbation before any output score
PERTURB_DEFAULTS = {"perturb_temperature": 1000.0, "perturb_eps": 0.0014}  # ODIN's (DESIGN.md)
PERTURB_SEARCH = {"perturb_temperature": [1, 10, 100, 1000], "perturb_eps": [0.0014, 0.0028]}


def _refuse(scorer: type[Postprocessor], name: str) -> str | None:
    """Why `scorer` cannot take shaped outputs, or None."""
    if scorer.family == "activation":
        return "it shapes activations itself; name its shaper instead (e.g. react+ebo)"
    if scorer.needs_extras or scorer.needs_layers or scorer.needs_checkpoints:
        return "it reads more than the logits and penultimate features"
    if scorer.needs_model and not hasattr(scorer, "logits"):
        return "it runs the model on perturbed inputs; of those, only the PRO family composes"
    return None


def composed(name: str) -> type[Postprocessor] | None:
    """The class of ``<shaper>+<scorer>``; None when `name` has no separator. Raises one line
    naming the problem when a part is unknown or cannot compose."""
    if SEPARATOR not in name:
        return None
    shaper_name, _, scorer_name = name.partition(SEPARATOR)
    if shaper_name == PERTURBATION:
        scorer = POSTPROCESSORS.get(scorer_name)
        reason = _refuse(scorer, scorer_name) or ("it runs the model itself" if scorer.needs_model else None)
        if reason:
            raise OodbenchError(f"'{name}': {scorer_name} does not take perturbed inputs: {reason}")
        return perturb(scorer)
    if shaper_name not in SHAPERS:
        from oodbench.errors import did_you_mean

        raise OodbenchError(f"unknown shaper '{shaper_name}' in '{name}'"
                            f"{did_you_mean(shaper_name, [*SHAPERS, PERTURBATION])}; shapers: {', '.join(SHAPERS)}, "
                            f"and {PERTURBATION} (input perturbation)")
    scorer = POSTPROCESSORS.get(scorer_name)
    reason = _refuse(scorer, scorer_name)
    if reason:
        raise OodbenchError(f"'{name}': {scorer_name} does not take shaped outputs: {reason}")
    return compose(SHAPERS[shaper_name], scorer)


_MADE: dict[tuple[str, type], type[Postprocessor]] = {}


def compose(shaper: Shaper, scorer: type[Postprocessor]) -> type[Postprocessor]:
    """The composite class (one per pair): the scorer's class with `Shaped` mixed in."""
    key = (shaper.name, scorer)
    if key in _MADE:
        return _MADE[key]
    clash = set(shaper.defaults) & set(scorer.defaults)
    if clash:
        raise OodbenchError(f"'{shaper.name}{SEPARATOR}{scorer.name}': both parts take {', '.join(sorted(clash))}")
    made = type(f"{type(shaper).__name__}_{scorer.__name__}", (Shaped, scorer), {
        "__module__": __name__, "shaper": shaper, "scorer": scorer, "family": "activation",
        "needs_features": True, "needs_fit": True, "needs_weights": shaper.needs_weights or scorer.needs_weights,
        "defaults": {**shaper.defaults, **scorer.defaults},
        "ranges": {**shaper.ranges, **scorer.ranges}, "fit_params": _fit_params(shaper, scorer),
        "search_parts": (shaper.searched_as, scorer.name), "code_modules": (scorer.__module__, *SHAPING_CODE),
        "name": f"{shaper.name}{SEPARATOR}{scorer.name}"})
    _MADE[key] = made
    return made


def perturb(scorer: type[Postprocessor]) -> type[Postprocessor]:
    """The class of ``odin+<scorer>`` (one per scorer)."""
    key = (PERTURBATION, scorer)
    if key not in _MADE:
        clash = set(PERTURB_DEFAULTS) & set(scorer.defaults)
        if clash:
            raise OodbenchError(f"'{PERTURBATION}{SEPARATOR}{scorer.name}': both parts take {', '.join(sorted(clash))}")
        _MADE[key] = type(f"Perturbed_{scorer.__name__}", (Perturbed, scorer), {
            "__module__": __name__, "scorer": scorer, "family": "gradient", "needs_model": True,
            "needs_features": scorer.needs_features, "grid_params": (),
            "defaults": {**PERTURB_DEFAULTS, **scorer.defaults},
            "ranges": {"perturb_temperature": Number(gt=0), "perturb_eps": Number(ge=0), **scorer.ranges},
            "search_space": PERTURB_SEARCH, "search_parts": (scorer.name,),
            "code_modules": (scorer.__module__, odin_step.__module__),
            "name": f"{PERTURBATION}{SEPARATOR}{scorer.name}"})
    return _MADE[key]


def _fit_params(shaper: Shaper, scorer: type[Postprocessor]) -> tuple[str, ...] | None:
    """The shaper's parameters (they change what the scorer is fitted on) and the scorer's own."""
    if not scorer.needs_fit:
        return tuple(shaper.defaults)
    return None if scorer.fit_params is None else (*shaper.defaults, *scorer.fit_params)


POSTPROCESSORS.resolver = composed
register_postprocessor("gen_react")(composed("react+gen"))
register_postprocessor("pro_gen_react")(composed("react+pro_gen"))
register_postprocessor("bats")(composed("bats+ebo"))  # BATS with the energy score, the paper's main setting
