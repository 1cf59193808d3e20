from datetime import date
from pathlib import Path

import pandas as pd

from crm_analytics.artifacts import ArtifactRef, StageResult
from crm_analytics.reporting import markdown_table
from tasks.churn import churn_section
from tasks.report import assemble_report
from tasks.validate import quality_section


def _png(path: str) -> ArtifactRef:
    return ArtifactRef(stage="report", name=Path(path).stem, path=path, kind="png", content_hash="x", bytes=1)


def test_report_puts_each_stage_section_and_its_figures_in_order():
    results = [
        StageResult(stage="ingest", artifacts={}),  # no section: nothing printed
        StageResult(stage="validate", artifacts={}, report_section="## Data quality\n\nq"),
        StageResult(stage="segment", artifacts={"figure_sizes": _png("/r/report/figures/segments_sizes.png")},
                    report_section="## Segments\n\ns"),
    ]
    text = assemble_report(date(2025, 12, 31), results, Path("/r/report"))
    assert text == ("# Customer analytics — as of 2025-12-31\n\n## Data quality\n\nq\n\n## Segments\n\ns\n\n"
                    "![segments sizes](figures/segments_sizes.png)\n")


def test_quality_section_lists_counts_rate_and_top_reasons():
    text = quality_section({"order_lines": {"rows_in": 10, "valid": 8, "quarantined": 2, "quarantine_rate": 0.2,
                                            "reasons": {"customer_id is missing": 2}}})
    assert "| order_lines | 10 | 8 | 2 | 20.00% | customer_id is missing (2) |" in text


def test_churn_section_states_the_held_out_auc_and_the_rule():
    validation = {"roc_auc": 0.8123, "pr_auc": 0.7, "f1": 0.6, "threshold": 0.4, "top_decile_lift": 2.5,
                  "brier": 0.18, "base_rate": 0.3, "n": 100}
    metrics = {"horizon_days": 90, "train_cutoff": "2025-07-04", "validation_cutoff": "2025-10-02",
               "chosen_model": "random_forest", "validation": validation}
    text = churn_section(metrics, pd.DataFrame([{"model": "random_forest", **validation}]))
    assert "held-out ROC AUC **0.812**" in text and "best-F1 rule" in text
    assert "| random_forest | 0.812 | 0.700 | 0.600 | 2.500 | 0.180 |" in text


def test_markdown_table_joins_lists_and_escapes_pipes():
    frame = pd.DataFrame({"a": [["P1", "P2"]], "b": ["x|y"], "c": [0.5]})
    assert markdown_table(frame) == "| a | b | c |\n|---|---|---|\n| P1, P2 | x\\|y | 0.500 |"
