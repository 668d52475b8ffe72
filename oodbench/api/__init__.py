"""oodbench from Python: a live model and in-memory data through the same harness.

`evaluate` (the leaderboard), `calibration` (logit noise), `operating_point` (per head,
with held-out classes), `detector` / `load_detector` (a fitted detector that leaves the
harness), and `Model` (how to read a network). See `oodbench.api.entry`.
"""

from oodbench.api.deployed import Detector, detector, load_detector
from oodbench.api.entry import calibration, evaluate, operating_point
from oodbench.api.models import Model

__all__ = ["Detector", "Model", "calibration", "detector", "evaluate", "load_detector", "operating_point"]
