from datetime import date

import pandas as pd

from tasks.report import render_report


def test_report_names_quality_segments_auc_and_rules():
    quality = {"order_lines": {"rows_in": 10, "valid": 8, "quarantined": 2, "quarantine_rate": 0.2,
                               "reasons": {"customer_id is missing": 2}}}
    cleaning = {"order_lines": {"exact_duplicates_dropped": 1, "return_lines": 3, "return_rate_by_value": 0.05}}
    profiles = pd.DataFrame({"segment_id": [0], "segment_name": ["champions"], "customers": [42], "share": [1.0],
                             "recency_days": [3.0], "frequency_orders": [9.0], "monetary_total": [900.0],
                             "rfm_score": [14.0]})
    validation = {"roc_auc": 0.8123, "pr_auc": 0.7, "f1": 0.6, "threshold": 0.4, "top_decile_lift": 2.5,
                  "brier": 0.18, "base_rate": 0.3, "n": 100}
    churn = {"horizon_days": 90, "train_cutoff": "2025-07-04", "validation_cutoff": "2025-10-02",
             "chosen_model": "random_forest", "validation": validation}
    comparison = pd.DataFrame([{"model": "random_forest", **validation}])
    rules = pd.DataFrame({"antecedents": [["P1"]], "consequents": [["P2"]], "support": [0.02],
                          "confidence": [0.6], "lift": [4.0]})
    text = render_report(date(2025, 12, 31), quality, cleaning, profiles, churn, comparison, rules,
                         {"rules": 1, "itemsets": 3, "baskets": 50, "customers_with_recommendations": 7},
                         {"Segment sizes": "figures/segment_sizes.png"})
    assert text.startswith("# Customer analytics — as of 2025-12-31")
    assert "| order_lines | 10 | 8 | 2 | 20.00% | customer_id is missing (2) |" in text
    assert "| 0 | champions | 42 |" in text
    assert "held-out ROC AUC **0.812**" in text
    assert "| P1 | P2 | 0.020 | 0.600 | 4.000 |" in text
    assert "![Segment sizes](figures/segment_sizes.png)" in text
