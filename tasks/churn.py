"""Churn: time-based labels, a model comparison validated forward in time, and scores for every customer.

With as-of date D and horizon h, a customer who bought before a cutoff C is a churner if they make no
purchase in (C, C + h]. Models are trained on cutoff D - 2h (labels end at D - h) and validated on cutoff
D - h (labels end at D): validation is strictly later than training, as in production. The model with the
best validation ROC AUC is then refitted on the most recent labelled cutoff (D - h) and scores every
customer as of D. Features at a cutoff come from the features stage's own function, so training and scoring
see exactly the same definitions.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import skops.io as sio
from prefect import task
from sklearn.base import ClassifierMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import ChurnOptions, RunSpec
from crm_analytics.reporting import markdown_table, save_figure
from tasks.common import stage_logger
from tasks.features import as_of_end, build_customer_features

NON_FEATURES = {"customer_id"}
RISK_BANDS = ((0.0, "low"), (0.3, "medium"), (0.6, "high"))


class ChurnOutput(NamedTuple):
    training_set: pd.DataFrame
    validation_predictions: pd.DataFrame
    comparison: pd.DataFrame
    metrics: dict
    scores: pd.DataFrame
    model: ClassifierMixin


def churn_labels(order_lines: pd.DataFrame, customer_ids: pd.Index, cutoff: date, horizon_days: int) -> pd.Series:
    """1 if the customer makes no purchase in (end of ``cutoff``, end of ``cutoff`` + h], else 0.

    Only lines in that window are looked at: nothing after ``cutoff + h`` can influence a label.
    """
    start, stop = as_of_end(cutoff), as_of_end(cutoff + timedelta(days=horizon_days))
    window = order_lines[(order_lines["order_ts"] >= start) & (order_lines["order_ts"] < stop)
                         & ~order_lines["is_return"]]
    bought = pd.Index(window["customer_id"].unique())
    return pd.Series((~customer_ids.isin(bought)).astype("int64"), index=customer_ids, name="churned")


def labelled_examples(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                      top_categories: list[str]) -> pd.DataFrame:
    """Features as of ``cutoff`` (from data before it only) joined with the label for the following h days."""
    past = order_lines[order_lines["order_ts"] < as_of_end(cutoff)]
    feats = build_customer_features(customers, past, cutoff, top_categories=top_categories)
    labels = churn_labels(order_lines, pd.Index(feats["customer_id"]), cutoff, horizon_days)
    return feats.assign(churned=labels.to_numpy(), cutoff=pd.Timestamp(cutoff))


def candidate_models(seed: int) -> dict[str, ClassifierMixin]:
    """Four model families; class weights handle the imbalance between churners and stayers."""
    return {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(
            class_weight="balanced", max_iter=2000, random_state=seed)),
        "decision_tree": DecisionTreeClassifier(max_depth=6, min_samples_leaf=25, class_weight="balanced",
                                                random_state=seed),
        "random_forest": RandomForestClassifier(n_estimators=200, min_samples_leaf=10, class_weight="balanced",
                                                n_jobs=2, random_state=seed),
        "gradient_boosting": HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05,
                                                            class_weight="balanced", random_state=seed),
    }


def top_decile_lift(y_true: np.ndarray, scores: np.ndarray) -> float:
    n = max(1, int(np.ceil(len(scores) * 0.1)))
    top = np.argsort(-scores, kind="stable")[:n]
    base = y_true.mean()
    return float(y_true[top].mean() / base) if base > 0 else float("nan")


def best_f1_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises F1 on the validation set (the stated rule for the operating point)."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def evaluate(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
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


def risk_band(probability: pd.Series) -> pd.Series:
    edges = [edge for edge, _ in RISK_BANDS] + [1.0 + 1e-9]
    return pd.cut(probability, bins=edges, labels=[name for _, name in RISK_BANDS], right=False).astype("string")


def train_and_score(customers: pd.DataFrame, order_lines: pd.DataFrame, as_of: date, options: ChurnOptions,
                    seed: int) -> ChurnOutput:
    h = options.horizon_days
    valid_cutoff, train_cutoff = as_of - timedelta(days=h), as_of - timedelta(days=2 * h)
    first_ts = order_lines["order_ts"].min()
    if pd.isna(first_ts) or first_ts >= as_of_end(train_cutoff - timedelta(days=h)):
        raise ValueError(
            f"churn needs history from before {train_cutoff - timedelta(days=h)} for a {h}-day horizon at as-of "
            f"{as_of} (train cutoff {train_cutoff}); the data starts at {first_ts}. Use a shorter horizon."
        )
    current = build_customer_features(customers, order_lines, as_of)
    categories = [c.removeprefix("share_") for c in current.columns if c.startswith("share_")]
    train = labelled_examples(customers, order_lines, train_cutoff, h, categories)
    valid = labelled_examples(customers, order_lines, valid_cutoff, h, categories)
    feature_columns = [c for c in current.columns if c not in NON_FEATURES]
    for name, frame in (("training", train), ("validation", valid)):
        if frame["churned"].nunique() < 2:
            raise ValueError(f"churn {name} set at its cutoff has only one class; cannot train or validate")

    def matrix(frame: pd.DataFrame) -> np.ndarray:
        return frame[feature_columns].astype("float64").fillna(-1.0).to_numpy()

    y_train, y_valid = train["churned"].to_numpy(), valid["churned"].to_numpy()
    rows, predictions, fitted = [], {}, {}
    for name, model in candidate_models(seed).items():
        model = clone(model).fit(matrix(train), y_train)
        scores = model.predict_proba(matrix(valid))[:, 1]
        metrics = evaluate(y_valid, scores, best_f1_threshold(y_valid, scores))
        rows.append({"model": name, **metrics})
        predictions[name], fitted[name] = scores, model
    comparison = pd.DataFrame(rows).sort_values("roc_auc", ascending=False, ignore_index=True)
    best = comparison.loc[0, "model"]

    production = clone(candidate_models(seed)[best]).fit(matrix(valid), y_valid)
    probability = pd.Series(production.predict_proba(matrix(current))[:, 1], index=current.index)
    scores = pd.DataFrame({
        "customer_id": current["customer_id"],
        "churn_probability": probability.round(6),
        "risk_band": risk_band(probability),
        "model": best,
    })
    validation_predictions = pd.DataFrame({"customer_id": valid["customer_id"], "churned": y_valid,
                                           "probability": predictions[best]})
    metrics = {
        "chosen_model": best,
        "horizon_days": h,
        "train_cutoff": train_cutoff.isoformat(),
        "validation_cutoff": valid_cutoff.isoformat(),
        "train_rows": len(train),
        "validation": comparison.loc[0].drop("model").to_dict(),
        "features": feature_columns,
    }
    training_set = pd.concat([train.assign(split="train"), valid.assign(split="validation")], ignore_index=True)
    return ChurnOutput(training_set, validation_predictions, comparison, metrics, scores, production)


def churn_section(metrics: dict, comparison: pd.DataFrame) -> str:
    v = metrics["validation"]
    return (
        f"## Churn\n\nHorizon {metrics['horizon_days']} days. Trained on cutoff {metrics['train_cutoff']}, validated "
        f"on the later cutoff {metrics['validation_cutoff']} ({v['n']} customers, churn rate {v['base_rate']:.1%}). "
        f"Chosen model: **{metrics['chosen_model']}** with held-out ROC AUC **{v['roc_auc']:.3f}**, PR AUC "
        f"{v['pr_auc']:.3f}, F1 {v['f1']:.3f} at threshold {v['threshold']:.2f} (best-F1 rule), top-decile lift "
        f"{v['top_decile_lift']:.2f}, Brier {v['brier']:.3f}.\n\n"
        + markdown_table(comparison[["model", "roc_auc", "pr_auc", "f1", "top_decile_lift", "brier"]])
    )


def churn_figures(predictions: pd.DataFrame) -> dict[str, plt.Figure]:
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    fpr, tpr, _ = roc_curve(predictions["churned"], predictions["probability"])
    roc_ax.plot(fpr, tpr)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Churn ROC (validation)")
    precision, recall, _ = precision_recall_curve(predictions["churned"], predictions["probability"])
    pr_ax.plot(recall, precision)
    pr_ax.axhline(predictions["churned"].mean(), linestyle="--", color="grey")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Churn precision-recall (validation)")
    figure.tight_layout()
    return {"roc_pr": figure}


@task(name="churn")
def churn(run: RunSpec, cleaned: StageResult, options: ChurnOptions, seed: int) -> StageResult:
    store = run.store
    out = train_and_score(store.read_frame(cleaned.ref("customers")), store.read_frame(cleaned.ref("order_lines")),
                          run.as_of, options, seed)
    v = out.metrics["validation"]
    stage_logger().info("churn: %s validation ROC AUC %.3f (PR AUC %.3f)", out.metrics["chosen_model"],
                        v["roc_auc"], v["pr_auc"])
    artifacts = {
        "training_set": store.write_frame("churn", "training_set", out.training_set),
        "validation_predictions": store.write_frame("churn", "validation_predictions", out.validation_predictions),
        "model_comparison": store.write_frame("churn", "model_comparison", out.comparison),
        "scores": store.write_frame("churn", "scores", out.scores),
        "metrics": store.write_json("churn", "metrics", out.metrics),
        "model": store.write_with("churn", "model.skops", "model", lambda p: sio.dump(out.model, p)),
    }
    for name, figure in churn_figures(out.validation_predictions).items():
        artifacts[f"figure_{name}"] = save_figure(store, "churn", name, figure)
    summary = {k: out.metrics[k] for k in ("chosen_model", "horizon_days", "train_cutoff", "validation_cutoff")}
    summary["validation_roc_auc"] = round(v["roc_auc"], 4)
    summary["validation_pr_auc"] = round(v["pr_auc"], 4)
    summary["scored_customers"] = len(out.scores)
    return StageResult(stage="churn", artifacts=artifacts, metrics=summary,
                       report_section=churn_section(out.metrics, out.comparison))
