"""Validation metrics: ranking, operating point (threshold rules, cross-fitted), calibration and risk bands."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from crm_analytics.parameters import ChurnOptions

RISK_BAND_NAMES = ("low", "medium", "high", "very high", "critical", "extreme")
CALIBRATION_BINS = 10


def top_decile_lift(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Churn rate among the 10% highest scores over the overall churn rate."""
    n = max(1, int(np.ceil(len(scores) * 0.1)))
    top = np.argsort(-scores, kind="stable")[:n]
    base = y_true.mean()
    return float(y_true[top].mean() / base) if base > 0 else float("nan")


def best_f1_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises F1."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def recall_threshold(y_true: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold whose recall still reaches ``target_recall`` (the fewest customers flagged)."""
    _, recall, thresholds = precision_recall_curve(y_true, scores)
    reaching = np.flatnonzero(recall[:-1] >= target_recall)
    return float(thresholds[reaching.max()]) if reaching.size else float(thresholds.min())


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, options: ChurnOptions) -> float:
    if options.threshold_rule == "target_recall":
        return recall_threshold(y_true, scores, options.target_recall)
    return best_f1_threshold(y_true, scores)


def threshold_rule_text(options: ChurnOptions) -> str:
    if options.threshold_rule == "target_recall":
        return f"target-recall rule ({options.target_recall:.0%})"
    return "best-F1 rule"


def evaluate(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking, operating-point and calibration metrics of one set of scores."""
    predicted = (scores >= threshold).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, scores)),
        "pr_auc": float(average_precision_score(y_true, scores)),
        "threshold": threshold,
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "top_decile_lift": top_decile_lift(y_true, scores),
        "brier": float(brier_score_loss(y_true, scores)),
        "base_rate": float(y_true.mean()),
        "n": len(y_true),
    }


def crossfit_operating_point(y_true: np.ndarray, scores: np.ndarray, ids: pd.Series,
                             options: ChurnOptions) -> dict[str, float | bool]:
    """Precision, recall and F1 at a threshold that did not see the customers it is measured on: the threshold
    is chosen on one half of the customers (a stable hash of the id) and applied to the other, both ways."""
    half = (pd.util.hash_pandas_object(pd.Series(ids, dtype="string"), index=False).to_numpy() % 2).astype(bool)
    predicted = np.zeros(len(y_true), dtype=int)
    for side in (half, ~half):
        other = ~side
        if len(np.unique(y_true[other])) < 2 or not side.any():
            return {}
        threshold = choose_threshold(y_true[other], scores[other], options)
        predicted[side] = scores[side] >= threshold
    return {"precision": float(precision_score(y_true, predicted, zero_division=0)),
            "recall": float(recall_score(y_true, predicted, zero_division=0)),
            "f1": float(f1_score(y_true, predicted, zero_division=0)), "cross_fitted": True}


def honest_metrics(y_true: np.ndarray, scores: np.ndarray, ids: pd.Series, options: ChurnOptions) -> dict:
    """``evaluate`` at the rule's threshold on all validation customers (the threshold used for scoring), with
    precision/recall/F1 replaced by their cross-fitted values, which are not tuned on the customers measured."""
    metrics: dict[str, Any] = {**evaluate(y_true, scores, choose_threshold(y_true, scores, options)),
                               "cross_fitted": False}
    metrics.update(crossfit_operating_point(y_true, scores, ids, options))
    return metrics


def calibration_table(y_true: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Customers per predicted-probability bin, their mean prediction and their observed churn rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1], right=False), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "p": scores, "y": y_true})
    table = frame.groupby("bin").agg(customers=("y", "size"), mean_predicted=("p", "mean"),
                                     observed_rate=("y", "mean")).reindex(range(bins))
    table.insert(0, "probability", [f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(bins)])
    table["customers"] = table["customers"].fillna(0).astype("int64")
    return table.reset_index(drop=True)


def risk_band(probability: pd.Series, edges: list[float] | tuple[float, ...] = (0.3, 0.6)) -> pd.Series:
    """Band names by probability: with edges (0.3, 0.6), low < 0.3 <= medium < 0.6 <= high."""
    bins = [0.0, *edges, 1.0 + 1e-9]
    labels = list(RISK_BAND_NAMES[: len(edges) + 1])
    return pd.cut(probability, bins=bins, labels=labels, right=False).astype("string")
