"""Exports of other shapes through a mapping alone: a customer table with explicit churn labels and no
transactions, a purchase log without products, and a basket list. Unit tests of the mapping features they
use (defaults, compose, line totals, the baskets format, optional entities), then each export through the real
flow on the temporary Prefect server, checked against answers known from the hand-made data."""

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from crm_analytics.mapping import CsvOptions, EntitySource, MappingError, SourceMapping, load_mapping
from crm_analytics.parameters import PipelineOptions
from crm_analytics.schema import PARSE_ERRORS, SOURCE_FILE, SOURCE_LINE, UNCATEGORISED
from tasks.common import SourceSchemaError
from tasks.ingest import parse_entity, read_baskets, read_source_text
from tests.export_support import (
    BASKETS,
    PLANTED_PAIR,
    write_basket_list,
    write_contract_table,
    write_purchase_log,
)

AS_OF = date(2025, 12, 31)


def _text(**columns: list) -> pd.DataFrame:
    frame = pd.DataFrame({k: pd.array(v, dtype="string") for k, v in columns.items()})
    frame[SOURCE_FILE] = "log.csv"
    frame[SOURCE_LINE] = np.arange(2, len(frame) + 2, dtype=np.int64)
    return frame


def _log_mapping(**order_lines: object) -> SourceMapping:
    return SourceMapping(entities={
        "customers": EntitySource(derive={"from": "order_lines", "columns": {"signup_date": "first:order_ts"}}),
        "order_lines": EntitySource(files="log.csv", **order_lines)})


# ---- mapping rules ------------------------------------------------------------------------------------------
def test_a_mapping_needs_transactions_or_labels_and_derives_missing_customers_and_products():
    with pytest.raises(ValueError, match="needs order_lines .* or churn_labels"):
        SourceMapping(entities={"customers": EntitySource(files="c.csv")})
    with pytest.raises(ValueError, match=r"lacks entities \['customers'\]"):
        SourceMapping(entities={"churn_labels": EntitySource(files="c.csv")})
    log_only = SourceMapping(entities={"order_lines": EntitySource(files="log.csv")})
    assert log_only.entities["customers"].derive.columns == {"signup_date": "first:order_ts"}
    assert log_only.read_order() == ["order_lines", "customers", "products"]
    labels_only = SourceMapping(entities={"customers": EntitySource(files="c.csv"),
                                          "churn_labels": EntitySource(files="c.csv")})
    assert set(labels_only.entities) == {"customers", "churn_labels"}
    derived = _log_mapping().entities["products"]
    assert derived.derive.from_entity == "order_lines"
    assert derived.derive.columns == {"category": f"const:{UNCATEGORISED}"}
    with pytest.raises(ValueError, match="compose 'order_id'"):
        EntitySource(files="x.csv", compose={"order_id": []})


def test_defaults_compose_and_line_totals_fill_what_the_export_lacks():
    mapping = _log_mapping(columns={"customer_id": "id", "order_ts": "date", "quantity": "cds",
                                    "unit_price": "dollars"},
                           formats={"order_ts": "%Y%m%d"}, unit_price_is_line_total=True,
                           compose={"order_id": [SOURCE_FILE, SOURCE_LINE]}, defaults={"product_id": "all"})
    text = _text(id=["7", "7", "9"], date=["20250102", "20250301", "20250102"], cds=["2", "1", "0"],
                 dollars=["30.00", "12.50", "5"])
    out = parse_entity(text, "order_lines", mapping, "log.csv")
    assert out["order_id"].tolist() == ["log.csv|2", "log.csv|3", "log.csv|4"]
    assert out["product_id"].tolist() == ["all"] * 3
    assert out["unit_price"].iloc[:2].tolist() == [15.0, 12.5]
    assert pd.isna(out["unit_price"].iloc[2])  # a total over zero units has no unit price
    assert out["order_ts"].iloc[1] == pd.Timestamp("2025-03-01", tz="UTC")


def test_compose_gives_no_key_when_a_part_is_missing_and_names_an_absent_part():
    mapping = _log_mapping(compose={"order_id": ["customer_id", "order_ts"]},
                           defaults={"product_id": "x", "quantity": 1, "unit_price": 0})
    out = parse_entity(_text(customer_id=["a", None], order_ts=["2025-01-02", "2025-01-02"]), "order_lines",
                       mapping, "log.csv")
    assert out["order_id"].iloc[0] == "a|2025-01-02"
    assert pd.isna(out["order_id"].iloc[1])  # quarantined for a missing order_id, not given a made-up one
    assert out["quantity"].tolist() == [1, 1] and out["unit_price"].tolist() == [0.0, 0.0]
    broken = _log_mapping(compose={"order_id": ["customer_id", "basket"]}, defaults={"product_id": "x"})
    with pytest.raises(SourceSchemaError, match=r"compose order_id: no column \['basket'\]"):
        parse_entity(_text(customer_id=["a"], order_ts=["2025-01-02"], quantity=["1"], unit_price=["1"]),
                     "order_lines", broken, "log.csv")


def test_read_baskets_gives_one_row_per_item_with_its_line(tmp_path):
    path = tmp_path / "baskets.csv"
    path.write_text("milk, bread ,butter\n\ntea\ncoffee,,sugar\n")
    out = read_baskets(path, EntitySource(files="baskets.csv", format="baskets"))
    assert out["basket"].tolist() == ["1", "1", "1", "3", "4", "4"]
    assert out["item"].tolist() == ["milk", "bread", "butter", "tea", "coffee", "sugar"]
    assert out[SOURCE_LINE].tolist() == [1, 1, 1, 3, 4, 4]


def test_a_column_aligned_file_without_header_reads_as_text(tmp_path):
    path = tmp_path / "CDNOW_master.txt"
    path.write_text("   00001 19970101  1   11.77\n   00002 19970112  5   77.00\n\t00003 19970102 2 20.76\n")
    mapping = load_mapping("cdnow")
    out = read_source_text(path, mapping.entities["order_lines"])
    assert out["customer"].tolist() == ["00001", "00002", "00003"]  # leading zeros kept: ids are text
    assert out["dollars"].tolist() == ["11.77", "77.00", "20.76"]
    assert out[SOURCE_LINE].tolist() == [1, 2, 3]  # no header: the first line is data
    out[SOURCE_FILE] = "CDNOW_master.txt"
    lines = parse_entity(out, "order_lines", mapping, "CDNOW_master.txt")
    assert lines["unit_price"].tolist() == [11.77, 15.4, 10.38]
    assert lines["order_id"].tolist() == ["CDNOW_master.txt|1", "CDNOW_master.txt|2", "CDNOW_master.txt|3"]
    path.write_text("00001 19970101 1 11.77 extra\n")  # an extra field: the row is kept, flagged for quarantine
    flagged = read_source_text(path, mapping.entities["order_lines"])
    assert flagged[PARSE_ERRORS].tolist() == ["line 1 has 5 fields, expected 4"]
    with pytest.raises(ValueError, match="column_names exactly when header is false"):
        CsvOptions(header=False)


def test_the_example_and_shipped_mappings_load(tmp_path):
    for write in (write_contract_table, lambda r: write_purchase_log(r)[0], lambda r: write_basket_list(r)[0]):
        assert load_mapping(write(tmp_path)).entities["customers"]
    assert set(load_mapping("telco").entities) == {"customers", "churn_labels"}
    for shipped in ("cdnow", "groceries"):  # purchase logs: customers and products derived from the lines
        assert load_mapping(shipped).read_order() == ["order_lines", "customers", "products"]
    with pytest.raises(MappingError):
        (tmp_path / "bad.yaml").write_text("entities: {customers: {files: c.csv}}\n")
        load_mapping(tmp_path / "bad.yaml")


# ---- the real flow on each shape ----------------------------------------------------------------------------
def _run(root, mapping, as_of: date = AS_OF):
    """The real flow over ``root/landing`` with ``mapping``: the run folder, its manifest and its report."""
    from flows.customer_analytics import customer_analytics

    run_dir = customer_analytics(as_of=as_of, options=PipelineOptions(data_root=str(root), mapping=str(mapping)))
    folder = root / "runs" / f"as_of={as_of}"
    assert run_dir.endswith(f"as_of={as_of}")
    manifest = json.loads((folder / "_manifest.json").read_text())
    for entity, counts in manifest["reconciliation"].items():
        assert counts["rows_in"] == counts["valid"] + counts["quarantined"], entity
        assert counts["data_lines"] == counts["lines_in"], entity
    return folder, manifest, (folder / "report" / "report.md").read_text()


@pytest.mark.integration
def test_a_customer_table_with_labels_and_no_transactions(tmp_path, prefect_server):
    mapping = write_contract_table(tmp_path)
    run_dir, manifest, report = _run(tmp_path, mapping)
    reconciliation, stages = manifest["reconciliation"], manifest["stages"]
    # 801 rows: one with tenure "twelve" is quarantined (and so is its label); one repeats a row exactly.
    one_row_a_line = {"rows_in": 801, "valid": 800, "quarantined": 1, "data_lines": 801, "lines_in": 801,
                      "lines_quarantined": 1}
    assert reconciliation["customers"] == reconciliation["churn_labels"] == one_row_a_line
    assert reconciliation["order_lines"]["rows_in"] == 0 and reconciliation["products"]["rows_in"] == 0
    customers = pd.read_parquet(run_dir / "clean" / "customers.parquet")
    assert len(customers) == 799 and set(customers["gender"]) == {"F", "M"}  # regex fix of Female/Male
    assert {"tenure", "contract", "monthly_charges", "total_charges"} <= set(customers.columns)

    churn = stages["churn"]
    assert churn["label_source"] == "explicit"
    table = pd.read_csv(tmp_path / "landing" / "customers.csv", dtype=str).drop_duplicates()
    table = table[table["customerID"].isin(customers["customer_id"])]
    # The planted label depends on contract, tenure and charges: the AUC of its true log-odds is the ceiling.
    tenure, monthly = table["tenure"].astype(float), table["MonthlyCharges"].astype(float)
    truth = 1.6 * (table["Contract"] == "Month-to-month") - 0.04 * tenure + 0.01 * (monthly - 60)
    ceiling = roc_auc_score(table["Churn"] == "Yes", truth)
    assert ceiling - 0.05 < churn["validation_roc_auc"] <= ceiling + 0.02, (churn, ceiling)
    scores = pd.read_parquet(run_dir / "churn" / "scores.parquet")
    assert set(scores["customer_id"]) == set(table.loc[table["Churn"] == "No", "customerID"])  # still active ones
    assert stages["segment"]["k"] == 0 and stages["rules"]["baskets"] == 0
    assert "no transaction features" in report and "nothing to segment" in report and "no rules" in report
    assert "there are no order lines" in stages["value"]["skipped"] and "## Customer value\n\n**Skipped:**" in report


@pytest.mark.integration
def test_a_purchase_log_without_products_or_order_ids(tmp_path, prefect_server):
    mapping, log = write_purchase_log(tmp_path)
    run_dir, manifest, report = _run(tmp_path, mapping)
    assert manifest["reconciliation"]["order_lines"] == {"rows_in": len(log), "valid": len(log), "quarantined": 0,
                                                         "data_lines": len(log), "lines_in": len(log),
                                                         "lines_quarantined": 0}
    lines = pd.read_parquet(run_dir / "clean" / "order_lines.parquet")
    assert len(lines) == len(log) and lines["order_id"].nunique() == len(log)  # one purchase per row
    assert set(lines["product_id"]) == {"all"} and set(lines["category"]) == {UNCATEGORISED}
    spent = lines.groupby("customer_id")["line_amount"].sum()
    expected = log.assign(id=log["id"].astype(str)).groupby("id")["dollars"].sum()
    assert np.allclose(spent.loc[expected.index], expected, atol=1e-4)  # amounts survive the unit-price split
    assert len(pd.read_parquet(run_dir / "clean" / "customers.parquet")) == log["id"].nunique()
    churn = manifest["stages"]["churn"]
    assert churn["label_source"] == "transactions" and churn["validation_roc_auc"] > 0.7
    assert manifest["stages"]["rules"]["rules"] == 0 and "no rule is possible" in report
    value = manifest["stages"]["value"]  # a purchase log is what the lifetime-value model describes
    assert "skipped" not in value and value["customers_valued"] == log["id"].nunique(), value


@pytest.mark.integration
def test_a_basket_list(tmp_path, prefect_server):
    mapping, baskets = write_basket_list(tmp_path)
    run_dir, manifest, report = _run(tmp_path, mapping)
    items = sum(len(b) for b in baskets)
    # one row per item, one line per basket: the lines are the baskets (with at least one item)
    assert manifest["reconciliation"]["order_lines"] == {"rows_in": items, "valid": items, "quarantined": 0,
                                                         "data_lines": BASKETS, "lines_in": BASKETS,
                                                         "lines_quarantined": 0}
    assert manifest["stages"]["rules"]["baskets"] == BASKETS
    rules = pd.read_parquet(run_dir / "rules" / "rules.parquet")
    planted = rules[[list(a) == [PLANTED_PAIR[0]] and list(c) == [PLANTED_PAIR[1]]
                     for a, c in zip(rules["antecedents"], rules["consequents"], strict=True)]]
    together = sum(set(PLANTED_PAIR) <= set(b) for b in baskets)
    assert len(planted) == 1 and planted["support_count"].iloc[0] == together
    reason = manifest["stages"]["churn"]["skipped"]  # undated baskets cannot be labelled
    assert "only one class" in reason and f"**Skipped:** {reason.rstrip('.')}." in report
    assert "dated the same day" in manifest["stages"]["value"]["skipped"]
