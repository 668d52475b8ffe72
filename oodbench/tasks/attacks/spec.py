"""The threat model of an attack, as an experiment config states it.

```yaml
attack: {kind: pgd, norm: linf, eps: [1/255, 2/255, 4/255, 8/255], steps: 20, restarts: 1,
         step_size: null, schedule: constant, target: both, seed: 0}
```

- ``kind``: ``pgd`` (projected gradient ascent, Madry et al., ICLR 2018, random start),
  ``fgsm`` (one signed step of size eps from the clean image, Goodfellow et al., 2015;
  L-inf only), ``apgd`` (AutoAttack's APGD, Croce & Hein, ICML 2020, via the
  ``autoattack`` package; it needs a differentiable loss, so not for BPDA or surrogate methods);
- ``norm``: ``linf`` or ``l2``; ``eps``: one budget or a list, numbers or fractions
  such as ``"8/255"``, in **[0,1]-pixel units before the model's normalisation** (0 is allowed:
  it reproduces the clean scores exactly);
- ``steps``, ``restarts``: gradient steps per restart, restarts (the first from a random
  point of the ball; every restart keeps its best iterate per image);
- ``step_size``: a fraction of eps per step (default 2.5 / steps, Madry et al.'s rule);
  ``schedule``: ``constant`` or ``halving`` (the step halves at 50% and 75% of the steps);
- ``target``: ``out`` (OOD test images pushed to look ID: their score raised), ``in`` (ID
  test images pushed to look OOD: their score lowered) or ``both`` (the worst case of AUROC
  and FPR@95: both at once);
- ``seed``: the random start's seed (per image, so batched equals one by one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from oodbench.errors import OodbenchError, did_you_mean

KINDS = ("pgd", "fgsm", "apgd")
NORMS = ("linf", "l2")
TARGETS = ("out", "in", "both")
SCHEDULES = ("constant", "halving")
DEFAULT_EPS = ("1/255", "2/255", "4/255", "8/255")


def parse_eps(value: Any, where: str = "attack.eps") -> float:
    """A budget: a non-negative number or a fraction written ``"a/b"`` (``"8/255"``)."""
    if isinstance(value, str):
        try:
            value = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise OodbenchError(f"{where}: {value!r} is not a number or a fraction like '8/255'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OodbenchError(f"{where}: {value!r} must be a non-negative number (a budget in [0,1] pixel units)")
    return float(value)


def eps_label(eps: float) -> str:
    """A budget as tables show it: ``8/255`` when it is a multiple of 1/255, else the number."""
    scaled = eps * 255
    return f"{round(scaled)}/255" if eps > 0 and abs(scaled - round(scaled)) < 1e-9 else f"{eps:g}"


@dataclass(frozen=True)
class AttackSpec:
    kind: str = "pgd"
    norm: str = "linf"
    eps: tuple[float, ...] = tuple(parse_eps(e) for e in DEFAULT_EPS)
    steps: int = 20
    restarts: int = 1
    step_size: float | None = None  # a fraction of eps; None: 2.5 / steps
    schedule: str = "constant"
    target: str = "both"
    seed: int = 0

    @property
    def step_fraction(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 / max(self.steps, 1)

    def fingerprint_payload(self) -> dict[str, Any]:
        """What decides the attacked images at one budget, for cache keys: every field but the
        list of budgets (each entry names its own), so adding a budget reuses the others."""
        return {key: value for key, value in asdict(self).items() if key != "eps"}

    def describe(self) -> str:
        """The threat model in words, as captions state it."""
        budgets = ", ".join(eps_label(e) for e in self.eps)
        steps = "1 step" if self.kind == "fgsm" else (f"{self.steps} steps x {self.restarts} restart(s), step "
                                                      f"{self.step_fraction:g} eps ({self.schedule})")
        return (f"{self.kind.upper()} {self.norm.upper()}, eps in {{{budgets}}} in [0,1] pixel units before "
                f"normalisation, {steps}, target {self.target}")


def _choice(raw: dict, key: str, choices: tuple[str, ...], where: str) -> str:
    value = raw.get(key, getattr(AttackSpec, key))
    if value not in choices:
        raise OodbenchError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}"
                            f"{did_you_mean(str(value), choices)}")
    return value


def _count(raw: dict, key: str, where: str, low: int) -> int:
    value = raw.get(key, getattr(AttackSpec, key))
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OodbenchError(f"{where}.{key}: {value!r} must be an integer >= {low}")
    return value


def parse_attack(raw: Any, where: str = "attack") -> AttackSpec:
    """An `AttackSpec` from a config mapping; unknown keys and bad values fail in one line."""
    if isinstance(raw, AttackSpec):
        return raw
    if not isinstance(raw, dict):
        raise OodbenchError(f"{where}: an attack is a mapping such as {{kind: pgd, norm: linf, eps: [8/255]}}")
    fields = AttackSpec.__dataclass_fields__
    for key in raw:
        if key not in fields:
            raise OodbenchError(f"{where}: unknown key '{key}'{did_you_mean(str(key), fields)}; "
                                f"keys: {', '.join(fields)}")
    eps = raw.get("eps", list(DEFAULT_EPS))
    eps = eps if isinstance(eps, (list, tuple)) else [eps]
    if not eps:
        raise OodbenchError(f"{where}.eps: give at least one budget")
    budgets = tuple(parse_eps(e, f"{where}.eps") for e in eps)
    kind = _choice(raw, "kind", KINDS, where)
    norm = _choice(raw, "norm", NORMS, where)
    if kind == "fgsm" and norm != "linf":
        raise OodbenchError(f"{where}: fgsm is an L-inf attack; use kind: pgd for norm {norm}")
    step_size = raw.get("step_size")
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                  or not 0 < step_size <= 2):
        raise OodbenchError(f"{where}.step_size: {step_size!r} must be a fraction of eps in (0, 2]")
    return AttackSpec(kind=kind, norm=norm, eps=budgets, steps=_count(raw, "steps", where, 1),
                      restarts=_count(raw, "restarts", where, 1),
                      step_size=None if step_size is None else float(step_size),
                      schedule=_choice(raw, "schedule", SCHEDULES, where),
                      target=_choice(raw, "target", TARGETS, where), seed=_count(raw, "seed", where, 0))


def threat_model(config, flags: dict[str, Any] | None = None) -> AttackSpec:
    """An experiment config's ``attack:`` mapping with `flags` (e.g. a command's ``--eps``) over
    its keys, checked as `parse_attack` checks it."""
    return parse_attack({**(config.attack or {}), **(flags or {})}, f"{config.source}: attack")
