"""The detector's own score as a differentiable function of [0,1] images: the attack's loss.

`detector_objective(method, model)` returns images -> one score per image (higher = more
ID, float64) with a gradient, and how that gradient is obtained, which the tables print:

- ``exact``: the postprocessor's own ``score`` on the outputs of a forward pass that keeps
  its graph, with its fitted state frozen (the softmax, logit, energy, Mahalanobis, ViM,
  activation-shaping ... scores are torch and differentiable);
- ``exact (inner steps differentiated)``: ODIN and PRO through their inner signed-gradient
  steps. ``x_t = x - sum eps sign(grad)`` and a sign has zero derivative almost
  everywhere, so ``dx_t / dx = I`` and the gradient of the score at ``x`` is that of the
  recorded scores at their own points (what BPDA with the identity would also give);
- ``exact (torch top-k)``: KNN's k-th nearest distance in torch (its search backend, faiss,
  is not differentiable); the gradient passes through the k-th neighbour;
- ``partial``: methods that read intermediate-layer statistics, which are computed
  without a gradient; the gradient flows through the logits and features only;
- ``surrogate: energy``: methods whose score has no gradient (CFOOD's counting, S&I's
  fractions of non-zero gradients, ...): the attack ascends the energy logsumexp(f) of the
  same model; the attacked images are then scored with the method's real score.

Every objective is evaluated in the model's precision and returned in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from oodbench.postprocessors.base import InvalidHyperparameter, Outputs, Postprocessor
from oodbench.postprocessors.distance import KNN, l2_normalise
from oodbench.postprocessors.odin import ODIN, odin_step
from oodbench.postprocessors.pro import PRO, max_softmax

Objective = Callable[[torch.Tensor], torch.Tensor]
EXACT, INNER, TOPK, PARTIAL, SURROGATE = ("exact", "exact (inner steps differentiated)", "exact (torch top-k)",
                                          "partial", "surrogate: energy")


@dataclass
class DetectorObjective:
    score: Objective  # images -> B scores (higher = more ID), differentiable
    gradient: str  # one of the names above


def model_outputs(method: Postprocessor, model, x: torch.Tensor) -> Outputs:
    """What a method reads of the images `x`: logits, features, extras, and the model and images
    themselves (for methods that run it again or read its layers)."""
    if method.needs_extras:
        features, logits, extras = model.forward_with_extras(x)
    else:
        (features, logits), extras = model.features(x), {}
    return Outputs(logits=logits, features=features, fc=model.fc, extras=extras, model=model,
                   inputs=TensorDataset(x, torch.zeros(len(x))), meta={"batch_size": max(len(x), 1)})


def method_scores(method: Postprocessor, model, x: torch.Tensor) -> torch.Tensor:
    """The method's real score of the images `x` (no gradient kept), float64 on the CPU."""
    with torch.no_grad():
        outputs = model_outputs(method, model, x)
    if method.needs_model:
        return method.grid_batch(model, x, [method])[0].detach().double().cpu()
    return method.score(outputs).detach().double().cpu()


def energy(model) -> Objective:
    return lambda x: torch.logsumexp(model(x).double(), dim=1)


def _odin(method: ODIN, model) -> Objective:
    temperature = float(method.params["temperature"])

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            inner = x.detach().requires_grad_(True)
            step = odin_step(model(inner), inner, temperature)
        return max_softmax(model(x - method.step_size(model, x) * step).double(), temperature)

    return score


def _pro(method: PRO, model) -> Objective:
    def score(x: torch.Tensor) -> torch.Tensor:
        forward = lambda v: method.logits(model, v)  # noqa: E731
        eps, offset, recorded = method.step_size(model, x), torch.zeros_like(x), []
        for _ in range(int(method.params["K"]) + 1):
            point = x + offset  # the offset is a constant: d point / d x = I
            logits = forward(point)
            recorded.append(method.base_score(logits.double()))
            if len(recorded) <= int(method.params["K"]):
                with torch.enable_grad():
                    inner = point.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(method.base_score(forward(inner)).sum(), inner)
                offset = offset - eps * grad.sign()
        return method.read(torch.stack(recorded, dim=1))

    return score


def _knn(method: KNN, model) -> Objective:
    k = int(method.params["k"])
    if k > len(method.bank):
        raise InvalidHyperparameter(f"knn: k={k} must be between 1 and the {len(method.bank)} fit samples")

    # The method keeps the fit features as they are and normalises them block by block as it
    # searches (`oodbench.postprocessors.distance.kth_nearest_distances`); the attack needs them
    # whole on its device, normalised once here.
    bank = l2_normalise(method.bank)

    def score(x: torch.Tensor) -> torch.Tensor:
        features, _ = model.features(x)
        distances = torch.cdist(l2_normalise(features), bank.to(features.device))
        return -distances.topk(k, dim=1, largest=False).values[:, -1].double()

    return score


FORMS = {ODIN: (_odin, INNER), PRO: (_pro, INNER), KNN: (_knn, TOPK)}  # class -> differentiable form


def detector_objective(method: Postprocessor, model, sample: torch.Tensor) -> DetectorObjective:
    """The method's score as a differentiable function of the images (see the module doc);
    `sample`: a few images of the data, on which a method without a form of its own is tried."""
    for cls in type(method).__mro__:
        if cls in FORMS:
            form, how = FORMS[cls]
            return DetectorObjective(form(method, model), how)
    if not method.needs_model:
        own = lambda x: method.score(model_outputs(method, model, x)).double()  # noqa: E731
        with torch.enable_grad():
            probe = sample[:2].detach().requires_grad_(True)
            try:
                differentiable = own(probe).requires_grad
            except RuntimeError:  # e.g. a .numpy() call on a tensor that keeps its graph
                differentiable = False
        if differentiable:
            return DetectorObjective(own, PARTIAL if method.needs_layers else EXACT)
    return DetectorObjective(energy(model), SURROGATE)
