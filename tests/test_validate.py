from datetime import date

import pandas as pd
import pytest

from crm_analytics.schema import QUARANTINE_REASON
from tasks.common import DataQualityError
from tasks.validate import check_quarantine_rate, load_suite, suite_parameters, validate_entity

UTC = "UTC"


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity",
                                        "unit_price", "_parse_errors"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    frame["quantity"] = frame["quantity"].astype("Int64")
    frame["unit_price"] = frame["unit_price"].astype("float64")
    for column in ("order_id", "customer_id", "product_id", "_parse_errors"):
        frame[column] = frame[column].astype("string")
    frame["_source_file"] = "lines.csv"
    frame["_source_line"] = range(2, len(frame) + 2)
    return frame


def test_each_bad_order_line_is_quarantined_with_its_reason():
    lines = _lines([
        ("o1", "c1", "2025-01-10 10:00", "p1", 2, 3.0, None),          # valid
        ("o2", "c1", "2025-01-10 10:00", "p1", -1, 3.0, None),         # a return: valid
        ("o3", None, "2025-01-10 10:00", "p1", 1, 3.0, None),          # null customer
        ("o4", "c9", "2025-01-10 10:00", "p1", 1, 3.0, None),          # unknown customer
        ("o5", "c1", "2025-02-01 00:00", "p1", 1, 3.0, None),          # after the as-of date
        ("o6", "c1", "2025-01-10 10:00", "p1", 1, -3.0, None),         # negative price
        ("o7", "c1", None, "p1", 1, 3.0, "order_ts='31/02/2025'"),     # unparseable timestamp
        ("o8", "c1", "2025-01-10 10:00", "p7", 1, 3.0, None),          # unknown product
    ])
    params = suite_parameters(date(2025, 1, 31), known_customer_ids=["c1"], known_product_ids=["p1"])
    outcome = validate_entity(lines, load_suite("order_lines"), params)
    assert outcome.valid["order_id"].tolist() == ["o1", "o2"]
    reasons = dict(zip(outcome.quarantine["order_id"], outcome.quarantine[QUARANTINE_REASON], strict=True))
    assert reasons["o3"] == "customer_id is missing"
    assert reasons["o4"] == "customer_id is not in customers (value 'c9')"
    assert reasons["o5"] == "order_ts is after the as-of date (value 2025-02-01 00:00:00+00:00)"
    assert reasons["o6"] == "unit_price is negative or implausible (value -3.0)"
    assert set(reasons["o7"].split("; ")) == {"a value does not parse as its declared type: order_ts='31/02/2025'",
                                              "order_ts is missing"}
    assert reasons["o8"] == "product_id is not in products (value 'p7')"
    assert outcome.quarantine["_source_line"].tolist() == [4, 5, 6, 7, 8, 9]
    assert len(outcome.valid) + len(outcome.quarantine) == len(lines)


def _customers(rows):
    rows = [(*row, "F") if len(row) == 3 else row for row in rows]
    frame = pd.DataFrame(rows, columns=["customer_id", "signup_date", "birth_year", "gender"])
    frame["gender"] = frame["gender"].astype("string")
    frame["signup_date"] = pd.to_datetime(frame["signup_date"], utc=True)
    frame["birth_year"] = frame["birth_year"].astype("Int64")
    frame["customer_id"] = frame["customer_id"].astype("string")
    frame["_source_file"], frame["_source_line"] = "c.csv", range(2, len(frame) + 2)
    frame["_parse_errors"] = pd.Series(pd.NA, index=frame.index, dtype="string")
    return frame


def test_exact_duplicates_pass_but_conflicting_keys_are_quarantined():
    customers = _customers([
        ("c1", "2024-01-01", 1980),
        ("c1", "2024-01-01", 1980),  # exact copy: kept for the clean stage to drop and count
        ("c2", "2024-01-01", 1990),
        ("c2", "2024-03-01", 1990),  # same id, different data: ambiguous, both quarantined
        ("c3", "2024-01-01", 1850),  # implausible birth year
    ])
    outcome = validate_entity(customers, load_suite("customers"), suite_parameters(date(2025, 1, 31)))
    assert outcome.valid["customer_id"].tolist() == ["c1", "c1"]
    assert outcome.quarantine["customer_id"].tolist() == ["c2", "c2", "c3"]
    assert outcome.reason_counts == {"customer_id appears on rows that disagree": 2,
                                     "birth_year is implausible": 1}


def test_gate_names_entity_rate_and_top_reasons():
    with pytest.raises(DataQualityError) as info:
        check_quarantine_rate("order_lines", 100, 20, {"customer_id is missing": 15, "quantity is zero": 5}, 0.05)
    message = str(info.value)
    assert "order_lines quarantined 20 of 100 rows (20.0% > 5.0% allowed)" in message
    assert "customer_id is missing (15)" in message


def test_gate_passes_at_the_threshold():
    assert check_quarantine_rate("customers", 100, 5, {}, 0.05) == pytest.approx(0.05)


def test_values_outside_an_allowed_set_are_quarantined():
    customers = _customers([("c1", "2024-01-01", 1980, "F"), ("c2", "2024-01-01", 1980, "female"),
                            ("c3", "2024-01-01", 1980, None)])
    outcome = validate_entity(customers, load_suite("customers"), suite_parameters(date(2025, 1, 31)))
    assert outcome.valid["customer_id"].tolist() == ["c1", "c3"]  # a missing optional value is not an error
    assert outcome.quarantine[QUARANTINE_REASON].tolist() == ["gender is not one of F, M, U, X (value 'female')"]
