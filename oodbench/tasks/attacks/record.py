"""The attack task's records: run `oodbench attack` on a finished run and keep its rows.

- `attack_and_record`: attack a finished run's detectors (`oodbench.tasks.attacks.evaluate`),
  every block of rows written to the results store's ``attacks`` table as it finishes, plus
  the adversarial-ID rows (`oodbench.tasks.attacks.adversarial_ood`) when asked;
- `store_rows` / `stored_attacks`: the rows as table ``attacks`` holds them, and read back per
  stored threat model (what `leaderboard --attack` and `compare --attack` render).
"""

from __future__ import annotations

import json

import pandas as pd

from oodbench.errors import OodbenchError
from oodbench.identity import digest
from oodbench.storage.store import ResultStore
from oodbench.tasks.attacks.adversarial_ood import KINDS, adversarial_ood
from oodbench.tasks.attacks.evaluate import attack_experiment
from oodbench.tasks.attacks.spec import AttackSpec


def attack_and_record(experiment, spec: AttackSpec, fpr: str, postprocessors: list[str] | None = None,
                      models: list[str] | None = None, adversarial_id: list[str] | None = None) -> pd.DataFrame:
    """Rows of `attack_experiment` (and of `adversarial_ood` for each kind of `adversarial_id`)
    of `experiment` under `spec`; the detector rows are stored with the FPR@95 convention `fpr`
    as they finish. Raises OodbenchError for an unknown adversarial kind or a postprocessor
    that is not part of the run."""
    for kind in adversarial_id or []:
        if kind not in KINDS:
            raise OodbenchError(f"--adversarial-id: '{kind}' is not one of {', '.join(KINDS)}")
    experiment.selected(postprocessors, models)  # every name part of the run, before anything is written
    benchmark, fingerprint = experiment.benchmark.name, experiment.plan.fingerprint
    store = ResultStore(experiment.config.results)
    try:
        frame = attack_experiment(experiment, spec, postprocessors, models,
                                  sink=lambda block: store.write_attack(store_rows(block, benchmark, fingerprint,
                                                                                   spec, fpr)))
    finally:
        store.close()
    if adversarial_id:
        frame = pd.concat([frame, adversarial_ood(experiment, spec, adversarial_id, postprocessors, models)],
                          ignore_index=True)
    return frame



def store_rows(block: list[dict], benchmark: str, data_fingerprint: str, spec: AttackSpec, fpr: str) -> list[dict]:
    """Rows of `oodbench.tasks.attacks.evaluate.attack_experiment` (one block) as table ``attacks``
    holds them: keyed by the threat model's fingerprint (every setting but the budgets, so
    runs with other budget lists add to the same table), with the FPR@95 convention the run
    printed."""
    payload = spec.fingerprint_payload()
    threat = json.dumps(payload, sort_keys=True)
    return [{"benchmark": benchmark, "data_fingerprint": data_fingerprint, "model": row["model"],
             "checkpoint": row["checkpoint"], "tags": row["tags"], "postprocessor": row["postprocessor"],
             "setting": row["params"], "threat": threat, "threat_fingerprint": digest(payload), "attack": row["attack"],
             "eps": row["eps"], "gradient": row["gradient"], "fpr_convention": fpr, "dataset": row["dataset"],
             "ood_group": row["group"], "metric": row["metric"], "value": row["value"], "created": None}
            for row in block]



def stored_attacks(store, benchmark: str, models: list[str] | None = None,
                   postprocessors: list[str] | None = None) -> list[tuple[pd.DataFrame, AttackSpec, str]]:
    """Per stored threat model of `benchmark`: (rows as `attack_experiment` returns them plus
    ``data_fingerprint``, the threat model with every stored budget, the FPR@95 convention of
    its last run). Of each model, only the rows of the data it was last attacked on."""
    rows = store.frame("attacks", benchmark=benchmark, model=models, postprocessor=postprocessors)
    found = []
    for _, part in rows.groupby("threat_fingerprint", sort=False):
        part = part.sort_values("created", kind="stable")
        latest = part.groupby("model").data_fingerprint.last()
        part = part[part.data_fingerprint == part.model.map(latest)]
        spec = AttackSpec(**json.loads(part.threat.iloc[-1]),
                          eps=tuple(sorted(set(part.eps[part.attack != "none"]))))
        frame = part.rename(columns={"setting": "params", "ood_group": "group"}).reset_index(drop=True)
        found.append((frame, spec, part.fpr_convention.iloc[-1]))
    return found
