"""Bad values in validation: ranges on every date and number column (reported with the value, personal values
never), unknown versus quarantined keys, the cascade summary and the gate's message, derived entities built from
valid origin rows only, and the pure ``validate_all`` core."""

from datetime import date

import numpy as np
import pandas as pd
import pytest
import yaml

from crm_analytics.mapping import EntitySource, SourceMapping, load_mapping
from crm_analytics.parameters import ValidationOptions
from crm_analytics.schema import QUARANTINE_REASON, SOURCE_FILE, SOURCE_LINE
from tasks.common import DataQualityError, PermanentError
from tasks.ingest import ingest_all, parse_entity
from tasks.suites import evaluate_suite, run_gx
from tasks.validate import (
    check_gates,
    check_quarantine_rate,
    load_suite,
    publishable_outcomes,
    quality_section,
    suite_parameters,
    validate_all,
    validate_entity,
    validation_metrics,
)

AS_OF = date(2025, 12, 31)
NO_GATE = ValidationOptions(max_quarantine_rate=1.0)
MAPPING = SourceMapping(entities={
    "customers": EntitySource(files="c.csv", keep=["full_name"], pii=["full_name"]),
    "products": EntitySource(files="p.csv"),
    "order_lines": EntitySource(files="l.csv"),
    "churn_labels": EntitySource(files="k.csv"),
})
CUSTOMER_COLUMNS = ["customer_id", "signup_date", "country", "gender", "birth_year", "email", "full_name", "channel"]
LINE_COLUMNS = ["order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"]


def _parsed(entity: str, columns: list[str], rows: list[tuple], mapping: SourceMapping = MAPPING) -> pd.DataFrame:
    """Rows given as text, typed the way ingest types them; line numbers start at 2 (after a header)."""
    text = pd.DataFrame([[None if v is None else str(v) for v in row] for row in rows], columns=columns,
                        dtype="string")
    text[SOURCE_FILE] = f"{entity}.csv"
    text[SOURCE_LINE] = np.arange(2, len(text) + 2, dtype=np.int64)
    return parse_entity(text, entity, mapping, f"{entity}.csv")


def customer(i: int, signup: str = "2024-03-01", gender: str = "F", birth_year: object = 1980) -> tuple:
    return (f"C{i:02d}", signup, "UK", gender, birth_year, f"secret{i}@mail.example", f"Secret Person{i}", "web")


def customers(*rows: tuple) -> pd.DataFrame:
    return _parsed("customers", CUSTOMER_COLUMNS, list(rows))


def products(*rows: tuple) -> pd.DataFrame:
    return _parsed("products", ["product_id", "category", "name", "list_price"], list(rows))


def lines(*rows: tuple) -> pd.DataFrame:
    return _parsed("order_lines", LINE_COLUMNS, list(rows))


def line(n: int, customer_id: str = "C01", ts: str = "2025-06-01 10:00:00", product: str = "P1",
         quantity: object = 1, price: object = 2.5) -> tuple:
    return (f"O{n}", customer_id, ts, product, quantity, price)


def reasons_by_line(frame: pd.DataFrame) -> dict[int, str]:
    return dict(zip(frame[SOURCE_LINE].tolist(), frame[QUARANTINE_REASON].tolist(), strict=True))


# ---- ranges, with the value ------------------------------------------------------------------------------------
def test_out_of_range_dates_in_every_date_column_are_quarantined_with_the_value():
    frames = {
        "customers": customers(customer(1), customer(2, signup="1850-03-01"), customer(3, signup="0001-01-01"),
                               customer(4, signup="2026-01-01"), customer(5, signup="1990-01-01")),
        "products": products(("P1", "home", "Mug", "2.5")),
        "order_lines": lines(line(1), line(2, ts="1850-03-01"), line(3, ts="0001-01-01 00:00:00"),
                             line(4, ts="2026-01-01 00:00:00"), line(5, ts="1989-12-31 23:59:59"),
                             line(6, ts="2025-12-31 23:59:59")),
    }
    outcomes = validate_all(frames, MAPPING, AS_OF, NO_GATE)
    assert reasons_by_line(outcomes["customers"].quarantine) == {
        3: "signup_date is before 1990-01-01 (value 1850-03-01 00:00:00+00:00)",
        4: "signup_date is before 1990-01-01 (value 0001-01-01 00:00:00+00:00)",
        5: "signup_date is after the as-of date (value 2026-01-01 00:00:00+00:00)",
    }  # 1990-01-01 itself is plausible
    assert reasons_by_line(outcomes["order_lines"].quarantine) == {
        3: "order_ts is before 1990-01-01 (value 1850-03-01 00:00:00+00:00)",
        4: "order_ts is before 1990-01-01 (value 0001-01-01 00:00:00+00:00)",
        5: "order_ts is after the as-of date (value 2026-01-01 00:00:00+00:00)",
        6: "order_ts is before 1990-01-01 (value 1989-12-31 23:59:59+00:00)",
    }
    # Counts group by the reason alone, never by value.
    assert outcomes["order_lines"].reason_counts == {"order_ts is before 1990-01-01": 3,
                                                     "order_ts is after the as-of date": 1}


def test_the_earliest_date_is_an_option_and_must_precede_the_as_of_date():
    frames = {"customers": customers(customer(1, signup="1850-03-01")), "products": products(),
              "order_lines": lines(line(1, ts="1850-03-01"))}
    outcomes = validate_all(frames, MAPPING, AS_OF, ValidationOptions(earliest_date=date(1800, 1, 1)))
    assert len(outcomes["customers"].valid) == 1 and len(outcomes["order_lines"].valid) == 0  # no product P1
    assert reasons_by_line(outcomes["order_lines"].quarantine) == {2: "product_id is not in products (value 'P1')"}
    with pytest.raises(PermanentError, match=r"^validation.earliest_date 1990-01-01 is after the as-of date "
                                             r"1985-06-30: every dated row would be quarantined"):
        validate_all(frames, MAPPING, date(1985, 6, 30), NO_GATE)


def test_infinite_negative_huge_and_zero_numbers_are_quarantined_with_the_value():
    frames = {
        "customers": customers(customer(1), customer(2, birth_year=2099), customer(3, birth_year=1850),
                               customer(4, birth_year=2025)),
        "products": products(("P1", "home", "Mug", "2.5"), ("P2", "home", "Inf", "1"),
                             ("P3", "home", "Neg", "-0.01"), ("P4", "home", "Huge", "1e9"),
                             ("P5", "home", "Minf", "1"), ("P6", "home", "Free", "0"),
                             ("P7", "home", "Unpriced", None)),
        "order_lines": lines(line(1), line(2), line(3), line(4, price="-3"),
                             line(5, price="1e12"), line(6, quantity="1000000"), line(7, quantity="-200000"),
                             line(8, quantity="0"), line(9, quantity="-2"), line(10, price="0")),
    }
    # A Parquet file or a SQL query delivers infinities as numbers (text "inf" is a parse error).
    frames["products"].loc[[1, 4], "list_price"] = [np.inf, -np.inf]
    frames["order_lines"].loc[[1, 2], "unit_price"] = [np.inf, -np.inf]
    outcomes = validate_all(frames, MAPPING, AS_OF, NO_GATE)
    assert reasons_by_line(outcomes["customers"].quarantine) == {
        3: "birth_year is implausible (value 2099)", 4: "birth_year is implausible (value 1850)"}
    products_out = outcomes["products"]
    assert reasons_by_line(products_out.quarantine) == {
        3: "list_price is not finite or out of range (value inf)",
        4: "list_price is not finite or out of range (value -0.01)",
        5: "list_price is not finite or out of range (value 1000000000.0)",
        6: "list_price is not finite or out of range (value -inf)",
    }
    assert products_out.valid["product_id"].tolist() == ["P1", "P6", "P7"]  # free, and a missing price, are fine
    assert reasons_by_line(outcomes["order_lines"].quarantine) == {
        3: "unit_price is negative or implausible (value inf)",
        4: "unit_price is negative or implausible (value -inf)",
        5: "unit_price is negative or implausible (value -3.0)",
        6: "unit_price is negative or implausible (value 1000000000000.0)",
        7: "quantity is out of range (value 1000000)",
        8: "quantity is out of range (value -200000)",
        9: "quantity is zero (value 0)",
    }  # a return (-2) and a free line (price 0) are valid
    assert outcomes["order_lines"].cascade == {}  # no line was taken by a quarantined customer or product


def test_the_compiled_ranges_agree_with_great_expectations_on_bad_values():
    customer_frame = customers(customer(1), customer(2, signup="1850-03-01"), customer(3, signup="0001-01-01"),
                               customer(4, signup="2026-02-01"), customer(5, birth_year=2099),
                               customer(6, gender="female"))
    product_frame = products(("P1", "home", "Mug", "2.5"), ("P2", "home", "Inf", "1"),
                             ("P3", "home", "Neg", "-1"), ("P4", "home", "Big", "1e7"), ("P5", "home", "N", None))
    product_frame.loc[1, "list_price"] = np.inf
    line_frame = lines(line(1), line(2, ts="1850-03-01"), line(3, ts="0001-01-01"), line(4, ts="2026-02-01"),
                       line(5), line(6, price="-1"), line(7, quantity="0"), line(8, quantity="999999"),
                       line(9, customer_id="C02"), line(10, customer_id="C99"), line(11, product="P2"),
                       line(12, product="P9"))
    line_frame.loc[4, "unit_price"] = np.inf
    params = suite_parameters(AS_OF, known_customer_ids=["C01", "C02"], quarantined_customer_ids=["C02"],
                              known_product_ids=["P1", "P2"], quarantined_product_ids=["P2"])
    for entity, frame, failing in (("customers", customer_frame, 5), ("products", product_frame, 3),
                                   ("order_lines", line_frame, 11)):
        suite = load_suite(entity)
        # The cross-check covers every row: it raises if a single verdict differs from GX's.
        failures, evaluation = evaluate_suite(frame, suite, params, cross_check_rows=len(frame))
        assert evaluation["gx_expectations"] == 0 and evaluation["cross_checked_rows"] == len(frame)
        assert len({label for labels in failures.values() for label in labels}) == failing, entity
        gx = run_gx(frame, suite, params)
        assert {r: set(v) for r, v in failures.items()} == {r: set(v) for r, v in gx.items()}, entity


# ---- unknown versus quarantined keys, and the cascade ----------------------------------------------------------
def test_unknown_and_quarantined_keys_have_distinct_reasons():
    mapping = MAPPING
    frames = {
        "customers": customers(customer(1), customer(2, birth_year=2099)),
        "products": products(("P1", "home", "Mug", "2.5"), ("P2", "home", "Bad", "-1")),
        "order_lines": lines(line(1), line(2, customer_id="C02"), line(3, customer_id="C77"),
                             line(4, product="P2"), line(5, product="P77"), line(6, customer_id="C02", quantity=0)),
        "churn_labels": _parsed("churn_labels", ["customer_id", "churned"],
                                [("C01", "true"), ("C02", "false"), ("C77", "true")], mapping),
    }
    outcomes = validate_all(frames, mapping, AS_OF, NO_GATE)
    assert reasons_by_line(outcomes["order_lines"].quarantine) == {
        3: "customer's row is quarantined in customers (value 'C02')",
        4: "customer_id is not in customers (value 'C77')",
        5: "product's row is quarantined in products (value 'P2')",
        6: "product_id is not in products (value 'P77')",
        7: "quantity is zero (value 0); customer's row is quarantined in customers (value 'C02')",
    }
    # The line with its own defect would be quarantined anyway: the cascade took one line of C02, not two.
    assert outcomes["order_lines"].cascade == {
        "customers": {"rows": 1, "keys": 1, "reasons": {"birth_year is implausible": 1}},
        "products": {"rows": 1, "keys": 1, "reasons": {"list_price is not finite or out of range": 1}},
        "other": {"rows": 3, "reasons": {"customer_id is not in customers": 1, "product_id is not in products": 1,
                                         "quantity is zero": 1, "customer's row is quarantined in customers": 1}},
    }
    assert reasons_by_line(outcomes["churn_labels"].quarantine) == {
        3: "customer's row is quarantined in customers (value 'C02')",
        4: "customer_id is not in customers (value 'C77')",
    }


def _cascade_export() -> dict[str, pd.DataFrame]:
    """100 customers, 4 of them quarantined (3 born in 2099, 1 with gender 'female'), 19 lines each (76 lines);
    924 lines of the 96 good customers, 3 of them with quantity 0 and 1 with a price of -1."""
    bad = {3: {"birth_year": 2099}, 7: {"birth_year": 2099}, 11: {"birth_year": 2099}, 15: {"gender": "female"}}
    good = [i for i in range(1, 101) if i not in bad]
    order_lines = [line(n, customer_id=f"C{good[n % 96]:02d}", quantity=0 if n < 3 else 1, price=-1 if n == 3 else 2.5)
                   for n in range(924)]
    order_lines += [line(1000 + 19 * k + j, customer_id=f"C{i:02d}") for k, i in enumerate(bad) for j in range(19)]
    return {"customers": customers(*[customer(i, **bad.get(i, {})) for i in range(1, 101)]),
            "products": products(("P1", "home", "Mug", "2.5")), "order_lines": lines(*order_lines)}


def test_the_cascade_summary_says_how_many_lines_each_upstream_cause_took():
    outcomes = validate_all(_cascade_export(), MAPPING, AS_OF, NO_GATE)
    assert len(outcomes["customers"].quarantine) == 4 and len(outcomes["order_lines"].quarantine) == 80
    assert outcomes["order_lines"].cascade == {
        "customers": {"rows": 76, "keys": 4, "reasons": {"birth_year is implausible": 3,
                                                         "gender is not one of F, M, U, X": 1}},
        "other": {"rows": 4, "reasons": {"quantity is zero": 3, "unit_price is negative or implausible": 1}},
    }
    metrics = validation_metrics(outcomes, MAPPING, NO_GATE)
    assert metrics["order_lines"]["cascade"] == outcomes["order_lines"].cascade
    assert metrics["order_lines"]["reasons"]["customer's row is quarantined in customers"] == 76
    assert "cascade" not in metrics["customers"]  # customers refer to nothing
    section = quality_section(metrics)
    assert ("- order_lines: 76 lines of 4 customers quarantined for birth_year is implausible (3), gender is not "
            "one of F, M, U, X (1)") in section


def test_the_gate_message_names_the_customers_that_caused_it():
    outcomes = validate_all(_cascade_export(), MAPPING, AS_OF, ValidationOptions())
    with pytest.raises(DataQualityError) as info:
        check_gates(outcomes, MAPPING, ValidationOptions())  # customers pass (4%), order lines do not (8%)
    assert str(info.value) == (
        "data-quality gate: order_lines quarantined 80 of 1,000 rows (8.0% > 5.0% allowed): 76 because their "
        "customer is quarantined (4 customers: birth_year is implausible (3), gender is not one of F, M, U, X (1)), "
        "4 other: quantity is zero (3), unit_price is negative or implausible (1). No model was retrained; see "
        "quarantine/order_lines.parquet")
    check_gates(outcomes, MAPPING, ValidationOptions(max_quarantine_rate=0.08))


def test_a_gate_without_cascade_keeps_its_top_reasons_and_counts_with_separators():
    with pytest.raises(DataQualityError, match=r"quarantined 1,200 of 10,000 rows \(12.0% > 5.0% allowed\); top "
                                               r"reasons: quantity is zero \(1,200\)\. No model"):
        check_quarantine_rate("order_lines", 10_000, 1_200, {"quantity is zero": 1_200}, 0.05,
                              {"other": {"rows": 1_200, "reasons": {"quantity is zero": 1_200}}})


# ---- derived entities ------------------------------------------------------------------------------------------
def _purchase_log(tmp_path, text: str) -> SourceMapping:
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "log.csv").write_text(text)
    path = tmp_path / "mapping.yaml"
    path.write_text(yaml.safe_dump({"name": "log", "entities": {"order_lines": {"files": "log.csv"}}}))
    return load_mapping(path)


def test_derived_customers_come_only_from_lines_that_pass_their_own_checks(tmp_path):
    header = ",".join(LINE_COLUMNS)
    mapping = _purchase_log(tmp_path, "\n".join([
        header,
        "O1,A,2025-03-01 10:00:00,P1,1,2.5",
        header,                                # a second file's header, concatenated: read as data
        "O2,A,1850-03-01 10:00:00,P1,1,2.5",   # A's 1850 line must not make A's signup date
        "O3,B,1850-03-01 10:00:00,P2,1,2.5",   # B has no other line: no customer B, no product P2
        "O4,C,2025-04-01 10:00:00,P1,0,2.5",   # quantity 0: C does not exist either
        "O5,A,2025-05-01 10:00:00,P3,1,2.5",
    ]) + "\n")
    frames, _ = ingest_all(mapping, tmp_path, AS_OF)
    assert frames["customers"]["customer_id"].tolist() == ["A"]
    assert frames["customers"]["signup_date"].tolist() == [pd.Timestamp("2025-03-01 10:00", tz="UTC")]
    assert frames["products"]["product_id"].tolist() == ["P1", "P3"]
    outcomes = validate_all(frames, mapping, AS_OF, NO_GATE)
    for entity, frame in frames.items():  # every row in is valid or quarantined, per entity
        assert len(frame) == len(outcomes[entity].valid) + len(outcomes[entity].quarantine), entity
    quarantined = reasons_by_line(outcomes["order_lines"].quarantine)
    assert sorted(quarantined) == [3, 4, 5, 6]
    assert "customer_id is not in customers (value 'customer_id')" in quarantined[3]  # the header as data
    assert quarantined[4] == "order_ts is before 1990-01-01 (value 1850-03-01 10:00:00+00:00)"
    assert quarantined[5] == ("order_ts is before 1990-01-01 (value 1850-03-01 10:00:00+00:00); customer_id is not "
                              "in customers (value 'B'); product_id is not in products (value 'P2')")
    assert quarantined[6] == "quantity is zero (value 0); customer_id is not in customers (value 'C')"
    assert outcomes["order_lines"].valid["order_id"].tolist() == ["O1", "O5"]


def test_no_valid_origin_row_derives_an_empty_entity(tmp_path):
    mapping = _purchase_log(tmp_path, ",".join(LINE_COLUMNS) + "\nO1,A,1850-03-01,P1,1,2.5\n")
    frames, _ = ingest_all(mapping, tmp_path, AS_OF)
    assert len(frames["customers"]) == 0 and len(frames["products"]) == 0
    outcomes = validate_all(frames, mapping, AS_OF, NO_GATE)
    assert len(outcomes["order_lines"].quarantine) == 1 and len(outcomes["customers"].valid) == 0


# ---- personal values -------------------------------------------------------------------------------------------
def test_personal_values_are_never_shown_in_reasons():
    suite = {"name": "personal", "expectations": [
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "email", "regex": "^x$"},
         "meta": {"reason": "email is odd"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "full_name", "value_set": ["x"]},
         "meta": {"reason": "full_name is odd"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "country", "value_set": ["x"]},
         "meta": {"reason": "country is odd"}},
    ]}
    frame = customers(customer(1))
    outcome = validate_entity(frame, suite, suite_parameters(AS_OF), cross_check_rows=0, personal=["full_name"])
    assert outcome.quarantine[QUARANTINE_REASON].tolist() == [
        "email is odd; full_name is odd; country is odd (value 'UK')"]  # e-mail is personal even undeclared


def test_published_outcomes_carry_pseudonyms_and_the_same_rows():
    outcomes = validate_all({"customers": customers(customer(1), customer(2, birth_year=2099))}, MAPPING, AS_OF,
                            NO_GATE)
    published = publishable_outcomes(outcomes, MAPPING, b"key")["customers"]
    for frame in (published.valid, published.quarantine):
        assert {"email", "full_name"}.isdisjoint(frame.columns)
        assert frame["email_pseudonym"].str.fullmatch(r"[0-9a-f]{32}").all()
        assert not frame.astype(str).apply(lambda c: c.str.contains("secret|Secret")).any().any()
    assert published.quarantine[QUARANTINE_REASON].tolist() == ["birth_year is implausible (value 2099)"]
    assert published.reason_counts == outcomes["customers"].reason_counts
