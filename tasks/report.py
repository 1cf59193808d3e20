"""Report: a Markdown summary of the run with PNG figures, also published as a Prefect artifact."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from crm_analytics.artifacts import RunStore, StageResult  # noqa: E402
from crm_analytics.parameters import RunSpec  # noqa: E402


def _table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return floatfmt.format(value)
        if isinstance(value, list | tuple | np.ndarray):
            return ", ".join(map(str, value))
        return str(value)
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def render_report(as_of: date, quality: dict, cleaning: dict, profiles: pd.DataFrame, churn_metrics: dict,
                  comparison: pd.DataFrame, top_rules: pd.DataFrame, rules_stats: dict,
                  figures: dict[str, str]) -> str:
    """The run report as Markdown. ``figures`` maps a figure's title to its path relative to the report."""
    quality_rows = pd.DataFrame([
        {"entity": entity, "rows in": m["rows_in"], "valid": m["valid"], "quarantined": m["quarantined"],
         "rate": f"{m['quarantine_rate']:.2%}",
         "top reasons": "; ".join(f"{r} ({n})" for r, n in list(m["reasons"].items())[:3]) or "-"}
        for entity, m in quality.items()
    ])
    lines_stats = cleaning["order_lines"]
    v = churn_metrics["validation"]
    segment_view = profiles[["segment_id", "segment_name", "customers", "share", "recency_days", "frequency_orders",
                             "monetary_total", "rfm_score"]].copy()
    segment_view["share"] = segment_view["share"].map("{:.1%}".format)
    parts = [
        f"# Customer analytics — as of {as_of.isoformat()}",
        "## Data quality",
        _table(quality_rows),
        f"Cleaning dropped {lines_stats['exact_duplicates_dropped']} exact duplicate order lines; "
        f"{lines_stats['return_lines']} lines are returns (return rate by value "
        f"{lines_stats['return_rate_by_value']:.2%}).",
        "## Segments",
        _table(segment_view, "{:.1f}"),
        "## Churn",
        f"Horizon {churn_metrics['horizon_days']} days. Trained on cutoff {churn_metrics['train_cutoff']}, "
        f"validated on the later cutoff {churn_metrics['validation_cutoff']} ({v['n']} customers, churn rate "
        f"{v['base_rate']:.1%}). Chosen model: **{churn_metrics['chosen_model']}** with held-out ROC AUC "
        f"**{v['roc_auc']:.3f}**, PR AUC {v['pr_auc']:.3f}, F1 {v['f1']:.3f} at threshold {v['threshold']:.2f} "
        f"(best-F1 rule), top-decile lift {v['top_decile_lift']:.2f}, Brier {v['brier']:.3f}.",
        _table(comparison[["model", "roc_auc", "pr_auc", "f1", "top_decile_lift", "brier"]]),
        "## Association rules",
        f"{rules_stats['rules']} rules from {rules_stats['itemsets']} frequent itemsets over "
        f"{rules_stats['baskets']} baskets; {rules_stats['customers_with_recommendations']} customers have "
        "recommendations.",
        _table(top_rules[["antecedents", "consequents", "support", "confidence", "lift"]]) if len(top_rules)
        else "_No rule passed the thresholds._",
        "## Figures",
        *[f"![{title}]({path})" for title, path in figures.items()],
    ]
    return "\n\n".join(parts) + "\n"


def _save(store: RunStore, name: str, figure: plt.Figure) -> tuple[str, str]:
    store.write_with("report", f"figures/{name}.png", "png", lambda p: figure.savefig(p, format="png", dpi=110))
    plt.close(figure)
    return name, f"figures/{name}.png"


def draw_figures(store: RunStore, profiles: pd.DataFrame, silhouette: pd.DataFrame,
                 predictions: pd.DataFrame) -> dict[str, str]:
    figures = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(profiles["segment_name"], profiles["customers"], color="#4C72B0")
    ax.set_xlabel("customers")
    ax.set_title("Segment sizes")
    fig.tight_layout()
    figures["Segment sizes"] = _save(store, "segment_sizes", fig)[1]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(silhouette["k"], silhouette["silhouette"], marker="o")
    ax.set_xlabel("k")
    ax.set_ylabel("silhouette")
    ax.set_title("Silhouette by number of segments")
    fig.tight_layout()
    figures["Silhouette by k"] = _save(store, "silhouette", fig)[1]

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    fpr, tpr, _ = roc_curve(predictions["churned"], predictions["probability"])
    roc_ax.plot(fpr, tpr)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set_xlabel("false positive rate")
    roc_ax.set_ylabel("true positive rate")
    roc_ax.set_title("Churn ROC (validation)")
    precision, recall, _ = precision_recall_curve(predictions["churned"], predictions["probability"])
    pr_ax.plot(recall, precision)
    pr_ax.axhline(predictions["churned"].mean(), linestyle="--", color="grey")
    pr_ax.set_xlabel("recall")
    pr_ax.set_ylabel("precision")
    pr_ax.set_title("Churn precision-recall (validation)")
    fig.tight_layout()
    figures["Churn ROC and PR curves"] = _save(store, "churn_curves", fig)[1]
    return figures


@task(name="report")
def report(run: RunSpec, validated: StageResult, cleaned: StageResult, segmented: StageResult,
           churned: StageResult, mined: StageResult) -> StageResult:
    store = run.store
    profiles = store.read_frame(segmented.ref("profiles"))
    figures = draw_figures(store, profiles, store.read_frame(segmented.ref("silhouette")),
                           store.read_frame(churned.ref("validation_predictions")))
    markdown = render_report(
        run.as_of, validated.metrics["entities"], cleaned.metrics, profiles,
        store.read_json(churned.ref("metrics")), store.read_frame(churned.ref("model_comparison")),
        store.read_frame(mined.ref("rules")).head(10), mined.metrics, figures,
    )
    ref = store.write_text("report", "report.md", markdown)
    # The UI cannot show local images: publish the text and tables; the figures live beside report.md.
    ui_text = "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
    create_markdown_artifact(
        markdown=ui_text + f"\n\nFull report with figures: `{Path(ref.path)}`",
        key="customer-analytics-report",
        description=f"Customer analytics report as of {run.as_of.isoformat()}",
    )
    return StageResult(stage="report", artifacts={"report": ref}, metrics={"figures": len(figures)})
