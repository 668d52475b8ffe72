"""Projected gradient ascent inside an eps-ball of [0,1] images, in plain torch.

`pgd` maximises a per-image objective (images -> one value per image, differentiable) over
``||x' - x|| <= eps`` (L-inf or L2) and ``x' in [0,1]`` (Madry et al., ICLR 2018): a random
start in the ball, then ``steps`` steps of ``alpha_t`` times the signed gradient (L-inf) or
the gradient over its L2 norm (L2), each projected back onto the ball and clamped to [0,1];
every image keeps its best iterate (over steps and restarts). Cost per image and restart:
``steps + 1`` forward passes (one per iterate, the last only scored) and ``steps`` backward
passes; a zero gradient is not retaken.

Randomness is per image (a generator seeded by the attack's seed and the image's index in
its split), so a batch gives the images it would give one by one. ``eps = 0`` returns the
images unchanged (bit for bit). `fgsm` is one signed step of eps from the clean image
(Goodfellow et al., ICLR 2015). `apgd` runs AutoAttack's APGD (Croce & Hein, ICML 2020)
on the same objective, through the ``autoattack`` package.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]  # B x ... images in [0,1] -> B values to maximise
ZERO_GRADIENT = 0.0


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """`delta` moved to the nearest point of the eps-ball (L-inf: clamp; L2: rescale)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest ascent direction of unit norm: sign(grad) for L-inf, grad / ||grad||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _norms(grad).clamp_min(1e-12)


def random_start(x: torch.Tensor, eps: float, norm: str, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A point drawn per image in its ball (L-inf: uniform per pixel; L2: a uniform direction
    and a uniform radius), from a generator seeded by (seed, the image's index)."""
    draws = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
        if norm == "linf":
            draws.append((torch.rand(x.shape[1:], generator=generator, dtype=torch.float64) * 2 - 1) * eps)
        else:
            noise = torch.randn(x.shape[1:], generator=generator, dtype=torch.float64)
            radius = torch.rand((), generator=generator, dtype=torch.float64)
            draws.append(noise / noise.norm().clamp_min(1e-12) * radius * eps)
    return torch.stack(draws).to(device=x.device, dtype=x.dtype)


def step_sizes(eps: float, steps: int, fraction: float, schedule: str) -> list[float]:
    """alpha_t for t = 0..steps-1: fraction * eps, halved at 50% and 75% of the steps with ``halving``."""
    sizes = []
    for t in range(steps):
        scale = 1.0 if schedule == "constant" else 0.5 ** (int(t >= steps // 2) + int(t >= (3 * steps) // 4))
        sizes.append(fraction * eps * scale)
    return sizes


def value_and_gradient(objective: Objective, x: torch.Tensor, fallback: Objective | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective at `x`, its gradient); rows whose gradient is exactly zero (a saturated softmax
    in float32) take the gradient of `fallback` instead, so that they still move."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad
    flat = _norms(grad).view(-1) == ZERO_GRADIENT
    if fallback is not None and bool(flat.any()):
        with torch.enable_grad():
            rows = x[flat].detach().requires_grad_(True)
            (extra,) = torch.autograd.grad(fallback(rows).sum(), rows)
        grad = grad.clone()
        grad[flat] = extra
    return value.detach(), grad.detach()


def pgd(objective: Objective, x: torch.Tensor, eps: float, *, norm: str = "linf", steps: int = 20,
        step_fraction: float | None = None, restarts: int = 1, schedule: str = "constant", seed: int = 0,
        indices: torch.Tensor | None = None, fallback: Objective | None = None) -> torch.Tensor:
    """The images of the ball around `x` (B x ..., in [0,1]) with the highest objective found.

    `eps`: radius in [0,1] pixel units; `step_fraction`: alpha as a fraction of eps (default
    2.5 / steps); `indices`: each image's index in its split (seeds its random start; default
    0..B-1); `fallback`: an objective whose gradient replaces an exactly zero one."""
    return pgd_with_values(objective, x, eps, norm=norm, steps=steps, step_fraction=step_fraction,
                           restarts=restarts, schedule=schedule, seed=seed, indices=indices, fallback=fallback)[0]


def pgd_with_values(objective: Objective, x: torch.Tensor, eps: float, *, norm: str = "linf", steps: int = 20,
                    step_fraction: float | None = None, restarts: int = 1, schedule: str = "constant",
                    seed: int = 0, indices: torch.Tensor | None = None, fallback: Objective | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pgd`'s images and the objective at each (float64; None when nothing moved: eps or steps 0),
    so that a caller whose objective is its score needs no further forward pass."""
    if eps == 0 or steps == 0:
        return x.clone(), None
    indices = torch.arange(len(x)) if indices is None else indices.cpu()
    sizes = step_sizes(eps, steps, step_fraction if step_fraction is not None else 2.5 / steps, schedule)
    best = x.clone()
    best_value = torch.full((len(x),), -torch.inf, device=x.device, dtype=torch.float64)
    for restart in range(restarts):
        current = (x + random_start(x, eps, norm, seed + restart, indices)).clamp(0, 1)
        for t in range(steps + 1):
            if t < steps:
                value, grad = value_and_gradient(objective, current, fallback)
            else:
                with torch.no_grad():
                    value = objective(current)
            better = value.double() > best_value
            best[better], best_value[better] = current[better], value.double()[better]
            if t < steps:
                moved = current + sizes[t] * direction(grad, norm)
                current = (x + project(moved - x, eps, norm)).clamp(0, 1)
    return best, best_value


def fgsm(objective: Objective, x: torch.Tensor, eps: float, fallback: Objective | None = None) -> torch.Tensor:
    """x + eps sign(grad objective(x)), clamped to [0,1] (one forward and one backward pass)."""
    if eps == 0:
        return x.clone()
    _, grad = value_and_gradient(objective, x, fallback)
    return (x + eps * grad.sign()).clamp(0, 1)


class _TwoClass(torch.nn.Module):
    """Logits [0, objective(x)]: their cross-entropy at label 0 is softplus(objective), which
    rises with the objective, so APGD-CE maximises the objective."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.objective(x).float()
        return torch.stack([torch.zeros_like(value), value], dim=1)


def autoattack_module():
    """AutoAttack's ``autopgd_base``: RobustBench 1.1.1 installs it as ``pyautoattack``."""
    try:
        from pyautoattack import autopgd_base
    except ImportError:
        try:
            from autoattack import autopgd_base
        except ImportError:
            from oodbench.errors import OodbenchError

            raise OodbenchError("kind: apgd needs AutoAttack: pip install robustbench==1.1.1 "
                                "(it installs autoattack as pyautoattack)") from None
    sys.modules.setdefault("autoattack.autopgd_base", autopgd_base)
    return autopgd_base


def apgd(objective: Objective, x: torch.Tensor, eps: float, *, norm: str = "linf", steps: int = 100,
         restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """AutoAttack's APGD-CE on the two-class logits [0, objective], the points of highest
    loss over restarts (``best_loss=True``); its randomness is torch's global generator, seeded."""
    if eps == 0:
        return x.clone()
    base = autoattack_module()
    attack = base.APGDAttack(_TwoClass(objective), n_iter=steps, norm={"linf": "Linf", "l2": "L2"}[norm],
                             n_restarts=restarts, eps=eps, seed=seed, loss="ce", device=x.device)
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    with torch.enable_grad():
        return attack.perturb(x, labels, best_loss=True).detach().clamp(0, 1)
