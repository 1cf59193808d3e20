"""The churn report section (labels, protocol, comparison, decision, operating point) and its figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from crm_analytics.reporting import markdown_table
from tasks.churn.examples import LABEL
from tasks.churn.metrics import RISK_BAND_NAMES


def horizon_text(metrics: dict) -> str:
    advice = metrics.get("horizon") or {}
    q = advice.get("quantiles") or {}
    if not q:
        return ""
    measured, total = advice.get("customers_measured"), advice.get("customers_total")
    sample = f" by a sample of {measured:,} of the {total:,} customers" if measured and measured < total else ""
    return (f"**Choosing the horizon.** Between consecutive orders of the same customer ({advice['repeat_gaps']:,} "
            f"repeat purchases{sample}) the gap is {q['p50']:.0f} days at the median, {q['p75']:.0f} at the 75th, "
            f"{q['p90']:.0f} at the 90th and {q['p95']:.0f} at the 95th percentile; "
            f"{advice['share_within_horizon']:.0%} of repeat purchases come within the {metrics['horizon_days']}-day "
            f"horizon. Suggested horizon: **{advice['suggested_horizon_days']} days** (90th percentile, rounded up "
            f"to whole weeks; gaps longer than the history cannot be seen, so short histories understate them).\n\n")


def churn_section(metrics: dict, comparison: pd.DataFrame, calibration: pd.DataFrame | None = None) -> str:
    """The report's churn section: labels, validation protocol, model comparison, decision, operating point."""
    v = metrics["validation"]
    rule = metrics.get("threshold_rule", "best-F1 rule")
    measured_on = ("measured on customers the threshold was not chosen on" if v.get("cross_fitted")
                   else "in-sample: too few customers to choose and measure it on different halves")
    if metrics.get("label_source") == "explicit":
        protocol = (f"Explicit churn labels ({metrics.get('labelled_rows', v['n']):,} labelled customers, churn rate "
                    f"{v['base_rate']:.1%}), validated by {metrics.get('validation_scheme', 'cross-validation')} "
                    f"(out-of-fold predictions).")
        if metrics.get("dropped_columns"):
            protocol += " Columns left out: " + ", ".join(f"{k} ({r})" for k, r in metrics["dropped_columns"].items())
    else:
        cutoffs = ", ".join(metrics.get("train_cutoffs", [metrics.get("train_cutoff", "?")]))
        protocol = (f"Horizon {metrics['horizon_days']} days: a customer churned at a cutoff if they made no purchase "
                    f"in the next {metrics['horizon_days']} days. Trained on cutoff(s) {cutoffs}, validated on the "
                    f"later cutoff {metrics['validation_cutoff']} ({v['n']:,} customers, churn rate "
                    f"{v['base_rate']:.1%}); features use only data before each cutoff, and labels only the "
                    f"{metrics['horizon_days']} days after it.")
    columns = [c for c in ["model", "roc_auc", "pr_auc", "f1", "top_decile_lift", "brier", "roc_auc_fold_std", "n"]
               if c in comparison.columns]
    decision = ""
    if "decision" in metrics:
        verdict = "promoted" if metrics.get("promoted", True) else "**not promoted**"
        decision = f"**Champion/challenger.** New model ({metrics.get('challenger_model')}) {verdict}: " \
                   f"{metrics['decision']}.\n\n"
    text = (
        f"## Churn\n\n{horizon_text(metrics)}{protocol}\n\n"
        + markdown_table(comparison[columns]) + "\n\n" + decision
        + f"Scoring model: **{metrics['chosen_model']}** with held-out ROC AUC **{v['roc_auc']:.3f}**, PR AUC "
        f"{v['pr_auc']:.3f}, top-decile lift {v['top_decile_lift']:.2f}, Brier {v['brier']:.3f}; at threshold "
        f"{v['threshold']:.2f} ({rule}) precision {v.get('precision', float('nan')):.3f}, recall "
        f"{v.get('recall', float('nan')):.3f}, F1 {v['f1']:.3f} ({measured_on})."
    )
    if "scored_customers" in metrics:
        counts = metrics.get("risk_bands", {})
        bands = ", ".join(f"{k} {counts[k]:,}" for k in RISK_BAND_NAMES if k in counts)
        where = ("each with its top factors" if metrics.get("factors_stored", True) else
                 "top factors computed where they are read (the action list, the customer card)")
        text += (f"\n\n{metrics['scored_customers']:,} customers scored ({bands}); {where}: "
                 f"{metrics.get('factor_method', '')}.")
    if calibration is not None and not calibration.empty:
        shown = calibration[calibration["customers"] > 0]
        text += "\n\nCalibration on the validation customers:\n\n" + markdown_table(shown)
    return text


def churn_figures(predictions: pd.DataFrame, calibration: pd.DataFrame, importances: pd.DataFrame,
                  gaps: pd.Series, horizon_days: int | None, suggested: int | None) -> dict[str, plt.Figure]:
    """ROC and PR curves of every candidate, the reliability diagram, importances and the gap histogram."""
    figures = {}
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    y = predictions[LABEL].to_numpy()
    for column in [c for c in predictions.columns if c.startswith("p_")]:
        fpr, tpr, _ = roc_curve(y, predictions[column])
        precision, recall, _ = precision_recall_curve(y, predictions[column])
        label = column.removeprefix("p_")
        roc_ax.plot(fpr, tpr, label=f"{label} ({roc_auc_score(y, predictions[column]):.3f})")
        pr_ax.plot(recall, precision, label=label)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Churn ROC (validation)")
    roc_ax.legend(fontsize=7)
    pr_ax.axhline(y.mean(), linestyle="--", color="grey")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Churn precision-recall (validation)")
    figure.tight_layout()
    figures["roc_pr"] = figure

    figure, ax = plt.subplots(figsize=(4.5, 4))
    shown = calibration[calibration["customers"] > 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.plot(shown["mean_predicted"], shown["observed_rate"], marker="o")
    ax.set(xlabel="mean predicted probability", ylabel="observed churn rate", title="Churn calibration")
    figure.tight_layout()
    figures["calibration"] = figure

    top = importances.head(15).iloc[::-1]
    figure, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1.2))
    ax.barh(top["feature"], top["auc_drop"], xerr=top["auc_drop_std"])
    ax.set(xlabel="ROC AUC lost when shuffled", title="Churn feature importance (validation)")
    figure.tight_layout()
    figures["importances"] = figure

    if len(gaps):
        figure, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(gaps[gaps <= gaps.quantile(0.99)], bins=60, color="tab:blue")  # the longest 1% would squash it
        if horizon_days:
            ax.axvline(horizon_days, color="tab:red", label=f"horizon {horizon_days} d")
        if suggested:
            ax.axvline(suggested, color="tab:green", linestyle="--", label=f"suggested {suggested} d")
        ax.set(xlabel="days between consecutive orders", ylabel="repeat purchases",
               title="Inter-purchase gaps (shortest 99%)")
        ax.legend()
        figure.tight_layout()
        figures["gaps"] = figure
    return figures
