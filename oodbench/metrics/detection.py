"""OOD detection metrics as plain functions of scores (higher = more ID) and OOD flags.

Conventions (DESIGN.md): AUROC is symmetric in which class is positive. FPR@95 comes
in two conventions, both stored:

- classic (ID positive): the share of OOD samples scored at or above the threshold
  that keeps 95% of ID samples;
- OpenOOD v1.5 (OOD positive): ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(is_ood, -score)``,
  the share of ID samples rejected at the first ROC point rejecting >= 95% of OOD.

Every metric is read off one table, `ScoreCounts`: one sort of the scores, then, for each
distinct score value, how many ID and OOD samples score at or below it (cumulative sums).
Tied scores form one threshold, as in scikit-learn: AUROC is the trapezoid over the
distinct thresholds (computed exactly in integers), AUPR is the step-wise sum of
precision times recall increments (scikit-learn's ``average_precision_score``), and the
OpenOOD FPR@95 reads the ROC points that ``roc_curve`` keeps by default
(``drop_intermediate=True``). `ood_metrics` sorts once for all five; the single-metric
functions sort once each. The tests hold them to scikit-learn, which this module does not
import.

AUPR comes in two rules (`AUPR_RULES`; a convention profile picks one): ``average_precision``
(the step-wise sum above, the area under the precision-recall step curve) and ``trapezoid``,
OpenOOD v1.5's ``auc(recall, precision)`` of ``precision_recall_curve``: the trapezoid rule
over the same points and the curve's end point (recall 0, precision 1). The trapezoid
interpolates precision linearly between thresholds, which over-states it (Davis & Goadrich,
ICML 2006), so ``average_precision`` is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _arrays(score, is_ood) -> tuple[np.ndarray, np.ndarray]:
    score = np.asarray(score, dtype=np.float64).ravel()
    is_ood = np.asarray(is_ood).astype(bool).ravel()
    if score.shape != is_ood.shape:
        raise ValueError(f"{score.shape[0]} scores for {is_ood.shape[0]} labels")
    if is_ood.all() or not is_ood.any():
        raise ValueError("metrics need both ID and OOD samples")
    finite = np.isfinite(score)
    if not finite.all():
        raise ValueError(f"{score.size - int(finite.sum())} of {score.size} scores are NaN or infinite")
    return score, is_ood


@dataclass(frozen=True)
class ScoreCounts:
    """Cumulative counts at each distinct score value v_1 < ... < v_K (int64 arrays of K).

    ``id_at_most[k]`` / ``ood_at_most[k]``: ID / OOD samples scored <= v_k; ``num_id`` and
    ``num_ood`` are the totals (the last entries). "At least v_k" counts follow as the
    totals minus the "at most v_(k-1)" counts.
    """

    id_at_most: np.ndarray
    ood_at_most: np.ndarray

    @classmethod
    def of(cls, score, is_ood) -> "ScoreCounts":
        score, is_ood = _arrays(score, is_ood)
        order = np.argsort(score)
        ranked = score[order]
        run_ends = np.flatnonzero(ranked[1:] != ranked[:-1])
        last_of_value = np.append(run_ends, ranked.size - 1)
        ood_at_most = np.cumsum(is_ood[order], dtype=np.int64)[last_of_value]
        return cls(id_at_most=last_of_value + 1 - ood_at_most, ood_at_most=ood_at_most)

    @property
    def num_id(self) -> int:
        return int(self.id_at_most[-1])

    @property
    def num_ood(self) -> int:
        return int(self.ood_at_most[-1])

    def at_least(self) -> tuple[np.ndarray, np.ndarray]:
        """(ID, OOD) counts scored >= v_k, for k = K..1 (highest score first)."""
        id_below = np.concatenate([[0], self.id_at_most[:-1]])
        ood_below = np.concatenate([[0], self.ood_at_most[:-1]])
        return (self.num_id - id_below)[::-1], (self.num_ood - ood_below)[::-1]

    # --- the metrics, each from the counts alone

    def auroc(self) -> float:
        """Trapezoid area under the ROC curve, exact in integers until the final division.

        Taken on `roc_curve(is_ood, -score)` (thresholds rising in score), which has the
        same area as `roc_curve(~is_ood, score)`."""
        ood, id_ = self.ood_at_most, self.id_at_most
        id_step = np.diff(id_, prepend=0)
        ood_twice_mid = ood + np.concatenate([[0], ood[:-1]])
        twice_area = int(np.dot(id_step, ood_twice_mid))  # < 2**63 up to ~3e9 samples
        return twice_area / (2 * self.num_id * self.num_ood)

    def fpr_id_positive(self, tpr: float = 0.95) -> float:
        id_at_least, ood_at_least = self.at_least()
        first = int(np.argmax(id_at_least >= kept_count(self.num_id, tpr)))
        return float(ood_at_least[first] / self.num_ood)

    def fpr_ood_positive(self, tpr: float = 0.95) -> float:
        ood, id_ = self.ood_at_most, self.id_at_most  # roc_curve(is_ood, -score) before its drop
        kept = np.ones(ood.size, bool)
        kept[1:-1] = (np.diff(ood, 2) != 0) | (np.diff(id_, 2) != 0)
        tpr_curve = np.concatenate([[0], ood[kept]]) / self.num_ood
        fpr_curve = np.concatenate([[0], id_[kept]]) / self.num_id
        return float(fpr_curve[np.argmax(tpr_curve >= tpr)])

    def aupr_in(self) -> float:
        id_at_least, ood_at_least = self.at_least()
        return _average_precision(id_at_least, ood_at_least)

    def aupr_out(self) -> float:
        return _average_precision(self.ood_at_most, self.id_at_most)

    def aupr_in_trapezoid(self) -> float:
        id_at_least, ood_at_least = self.at_least()
        return _trapezoid_precision(id_at_least, ood_at_least)

    def aupr_out_trapezoid(self) -> float:
        return _trapezoid_precision(self.ood_at_most, self.id_at_most)


def _average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """sum_k (R_k - R_(k-1)) P_k over thresholds admitting more and more samples."""
    precision = positives / (positives + negatives)
    recall_step = np.diff(positives, prepend=0) / positives[-1]
    return float(np.dot(recall_step, precision))


def _trapezoid_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The trapezoid rule over (recall, precision) at each threshold, from (0, 1) on."""
    precision = np.concatenate([[1.0], positives / (positives + negatives)])
    recall = np.concatenate([[0.0], positives / positives[-1]])
    return float(np.dot(np.diff(recall), (precision[1:] + precision[:-1]) / 2))


def kept_count(num_id: int, keep: float = 0.95) -> int:
    """ceil(keep * num_id) (at least 1): how many ID samples a threshold keeping `keep` keeps."""
    return max(int(np.ceil(keep * num_id - 1e-9)), 1)


def auroc(score, is_ood) -> float:
    """Area under the ROC curve of telling ID (high score) from OOD; in [0, 1].

    `score`: N scores, higher = more ID; `is_ood`: N flags. Equals scikit-learn's
    ``roc_auc_score(~is_ood, score)`` (ties count one half)."""
    return ScoreCounts.of(score, is_ood).auroc()


def auroc_rows(id_scores, ood_scores) -> list[float]:
    """`auroc` of each row b of ID scores ``id_scores[b]`` (B x N) against OOD scores
    ``ood_scores[b]`` (B x M): what a search over B hyperparameter settings needs. Bit for
    bit `auroc`: twice the area is the same integer, sum over ID samples of
    #(OOD scored lower) + #(OOD scored at most the same), over the same denominator; both
    sides are sorted row-wise in one call each, then each row's counts are two binary
    searches of its sorted ID scores in its sorted OOD scores (numpy's search walks sorted
    keys cheaply); the second search only for a row where an OOD score equals an ID score
    (else both counts are the same). The scores must be finite (callers check them first)."""
    id_scores, ood_scores = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    num_id, num_ood = id_scores.shape[1], ood_scores.shape[1]
    if not (num_id and num_ood):
        raise ValueError("metrics need both ID and OOD samples")
    ood_sorted, id_sorted = np.sort(ood_scores, axis=1), np.sort(id_scores, axis=1)
    twice_area = []
    for ids, ood in zip(id_sorted, ood_sorted):
        lower = np.searchsorted(ood, ids, "left")  # OOD scored lower than each ID score
        tied = (ood.take(np.minimum(lower, num_ood - 1)) == ids).any()  # the first OOD at or above it equals it
        at_most = np.searchsorted(ood, ids, "right") if tied else lower
        twice_area.append(int(lower.sum()) + int(at_most.sum()))
    return [area / (2 * num_id * num_ood) for area in twice_area]


def fpr_at_tpr(score, is_ood, tpr: float = 0.95) -> float:
    """Classic FPR@TPR with ID positive: share of OOD scored >= the ID `tpr` threshold.

    The threshold is the largest score t with at least `tpr` of ID samples >= t
    (`threshold_keeping`), i.e. the ROC point of `roc_curve(~is_ood, score)` first
    reaching TPR >= `tpr`.
    """
    return ScoreCounts.of(score, is_ood).fpr_id_positive(tpr)


def threshold_keeping(id_scores, keep: float = 0.95) -> float:
    """The largest t with at least ceil(keep * N) of `id_scores` >= t."""
    ranked = np.sort(np.asarray(id_scores, dtype=np.float64))[::-1]
    return float(ranked[kept_count(ranked.size, keep) - 1])


def fpr_at_tpr_openood(score, is_ood, tpr: float = 0.95) -> float:
    """OpenOOD v1.5's FPR@95: OOD positive, `fpr[argmax(tpr >= 0.95)]` of `roc_curve(is_ood, -score)`."""
    return ScoreCounts.of(score, is_ood).fpr_ood_positive(tpr)


def aupr_in(score, is_ood) -> float:
    """Average precision with ID as the positive class (score ranks ID first)."""
    return ScoreCounts.of(score, is_ood).aupr_in()


def aupr_out(score, is_ood) -> float:
    """Average precision with OOD as the positive class (-score ranks OOD first)."""
    return ScoreCounts.of(score, is_ood).aupr_out()


def accuracy(logits_or_predictions, labels) -> float:
    pred = np.asarray(logits_or_predictions)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    return float(np.mean(pred == np.asarray(labels)))


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins over (0, 1]."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def aupr_in_trapezoid(score, is_ood) -> float:
    """OpenOOD v1.5's AUPR-In: ``auc(recall, precision)`` of ``precision_recall_curve(~is_ood, score)``."""
    return ScoreCounts.of(score, is_ood).aupr_in_trapezoid()


def aupr_out_trapezoid(score, is_ood) -> float:
    """OpenOOD v1.5's AUPR-Out: ``auc(recall, precision)`` of ``precision_recall_curve(is_ood, -score)``."""
    return ScoreCounts.of(score, is_ood).aupr_out_trapezoid()


OOD_METRICS = {
    "fpr95": ScoreCounts.fpr_id_positive,
    "fpr95_openood": ScoreCounts.fpr_ood_positive,
    "auroc": ScoreCounts.auroc,
    "aupr_in": ScoreCounts.aupr_in,
    "aupr_out": ScoreCounts.aupr_out,
}
AUPR_RULES = {  # rule -> (AUPR-In, AUPR-Out), stored as aupr_in / aupr_out
    "average_precision": (ScoreCounts.aupr_in, ScoreCounts.aupr_out),
    "trapezoid": (ScoreCounts.aupr_in_trapezoid, ScoreCounts.aupr_out_trapezoid),
}


def ood_metrics(id_score, ood_score, aupr: str = "average_precision") -> dict[str, float]:
    """Every metric of `OOD_METRICS` for one ID-vs-OOD pair of score arrays, from one sort.

    `id_score`: scores of the ID test samples, `ood_score`: of the OOD samples (higher =
    more ID); each metric equals its single-metric function on the concatenation. `aupr`:
    the AUPR rule of `AUPR_RULES` the ``aupr_in`` / ``aupr_out`` values follow."""
    id_score = np.asarray(id_score, dtype=np.float64).ravel()
    ood_score = np.asarray(ood_score, dtype=np.float64).ravel()
    score = np.concatenate([id_score, ood_score])
    is_ood = np.concatenate([np.zeros(id_score.size, bool), np.ones(ood_score.size, bool)])
    counts = ScoreCounts.of(score, is_ood)
    metrics = {**OOD_METRICS, **dict(zip(("aupr_in", "aupr_out"), AUPR_RULES[aupr]))}
    return {name: float(metric(counts)) for name, metric in metrics.items()}
