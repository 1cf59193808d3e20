"""Lookups (columns an entity takes from another table by key) and discounts in the price paid: the pure core on
hand-made frames with stated answers, the mapping's checks, daily header and line files read incrementally, and
a normalized five-file export through the real flow with a mapping alone."""

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_analytics.mapping import EntitySource, Lookup, SourceMapping, load_mapping
from crm_analytics.parameters import PipelineOptions, ValidationOptions
from crm_analytics.schema import PARSE_ERRORS, QUARANTINE_REASON, SOURCE_FILE, SOURCE_LINE, SOURCE_LINES
from tasks.common import SourceSchemaError
from tasks.ingest import History, ingest_all, ingest_metrics, parse_files
from tasks.ingest.lookups import LookupTable, attach_lookups, look_up
from tasks.ingest.parse import parse_numbers, price_paid
from tasks.validate import publishable_outcomes, validate_all
from tests.normalized_support import (
    HAND_CATEGORIES,
    HAND_ORDER_COUNTS,
    HAND_REVENUE,
    MAPPING,
    ORPHAN_ORDER,
    REPEATED_ORDER,
    expected_answers,
    normalized_tables,
    write_normalized_export,
)

AS_OF = date(2025, 12, 31)
HEADERS = Lookup(what="order header", files="orders.csv", key={"OrderID": "OrderID"},
                 columns={"customer_id": "CustomerID", "order_ts": "OrderDate"})


def _text(file: str = "lines.csv", errors: list | None = None, **columns: list) -> pd.DataFrame:
    frame = pd.DataFrame({k: pd.array(v, dtype="string") for k, v in columns.items()})
    frame[SOURCE_FILE] = file
    frame[SOURCE_LINE] = np.arange(2, len(frame) + 2, dtype=np.int64)
    frame[SOURCE_LINES] = np.ones(len(frame), dtype=np.int64)
    frame[PARSE_ERRORS] = pd.array(errors or [None] * len(frame), dtype="string")
    return frame


def _headers(lookup: Lookup = HEADERS, errors: list | None = None, **columns: list) -> LookupTable:
    return LookupTable(lookup, _text("orders.csv", errors, **columns), {})


# ---- the pure core ------------------------------------------------------------------------------------------
def test_each_row_finds_one_header_or_says_why_not_and_no_row_is_multiplied():
    # Headers: 1 -> a, 2 twice (a and b), 3 on a damaged line, 4 -> c. Lines: 1, 9 (no header), 2, " 4 ", 3, "".
    table = _headers(OrderID=["1", "2", "2", "3", "4"], CustomerID=["a", "a", "b", "x", "c"],
                     OrderDate=["d1", "d2", "d2", "d3", "d4"],
                     errors=[None, None, None, "line 5 has 4 fields, expected 3", None])
    lines = _text(OrderID=["1", "9", "2", " 4 ", "3", ""], Qty=["1", "2", "3", "4", "5", "6"])
    columns, problems, counts = look_up(lines, ["OrderID"], table)
    assert columns["customer_id"].tolist() == ["a", pd.NA, pd.NA, "c", pd.NA, pd.NA]
    assert columns["order_ts"].tolist() == ["d1", pd.NA, pd.NA, "d4", pd.NA, pd.NA]
    assert problems.tolist() == [
        None, "no order header '9' in orders.csv",
        "order header '2' is not unique in orders.csv (2 rows: line 3, line 4)", None,
        "order header '3' in orders.csv is on a damaged line", "no order header: OrderID is empty"]
    assert counts == {"rows_without_match": 2, "rows_with_repeated_key": 1, "rows_with_damaged_match": 1}

    text, per_lookup = attach_lookups(lines, EntitySource(files="lines.csv", lookup=[HEADERS]), [table], "lines.csv")
    assert len(text) == len(lines)  # six rows in, six out, in order, lineage untouched
    assert text[SOURCE_LINE].tolist() == lines[SOURCE_LINE].tolist() and text["Qty"].tolist() == lines["Qty"].tolist()
    assert text[PARSE_ERRORS].notna().tolist() == [False, True, True, False, True, True]
    assert per_lookup == {"order header": counts}


def test_a_compound_key_and_a_personal_key_that_is_never_quoted():
    lookup = Lookup(what="store order", files="orders.csv", key={"Store": "Shop", "OrderID": "Nr"},
                    columns={"customer_id": "Customer"})
    table = _headers(lookup, Shop=["A", "B"], Nr=["1", "1"], Customer=["x", "y"])
    lines = _text(Store=["B", "A", "C"], OrderID=["1", "1", "1"])
    columns, problems, _ = look_up(lines, ["Store", "OrderID"], table)
    assert columns["customer_id"].tolist() == ["y", "x", pd.NA]
    assert problems[2] == "no store order 'C|1' in orders.csv"
    _, hidden, _ = look_up(lines, ["Store", "OrderID"], table, personal_key=True)
    assert hidden[2] == "no store order <redacted> in orders.csv"


def test_the_discount_becomes_part_of_the_price_paid():
    price = pd.Series([10.0, 10.0, 10.0, 10.0, 10.0, 10.0])
    quantity = pd.Series([4, 4, 4, 4, -2, 4])
    text = pd.Series(["0.25", "", "1.5", "x", "0.5", "0"], dtype="string").replace("", pd.NA)
    number = parse_numbers(text)
    net, (rows, messages) = price_paid(price, quantity, text, number, "fraction")
    # 10 * 0.75; no discount; 150 % off; not a number; a return at its discounted price; 0 % off
    assert net.tolist()[:2] == [7.5, 10.0] and np.isnan(net.iloc[2]) and np.isnan(net.iloc[3])
    assert net.tolist()[4:] == [5.0, 10.0]
    assert rows.tolist() == [2, 3]
    assert messages.tolist() == ["discount=1.5 is not a fraction from 0 to 1", "discount='x'"]
    amounts = pd.Series([15.0, 2.0, 8.0])
    for kind, expected in (("percent", [8.5, 9.8, 9.2]), ("unit_amount", [np.nan, 8.0, 2.0]),
                           ("line_amount", [6.25, 9.5, 8.0])):
        net, (rows, messages) = price_paid(price[:3], quantity[:3], amounts.astype(str), amounts, kind)
        assert np.allclose(net, expected, equal_nan=True), kind
    assert messages.tolist() == [] and rows.tolist() == []
    net, (rows, messages) = price_paid(price[:3], quantity[:3], amounts.astype(str), amounts, "unit_amount")
    assert messages.tolist() == ["discount=15.0 is more than the price"]


def test_the_mapping_checks_lookups_and_discounts():
    def entities(**order_lines):
        return {"customers": EntitySource(files="c.csv"), "order_lines": EntitySource(files="l.csv", **order_lines)}

    with pytest.raises(ValueError, match=r"lookup\[0\]\.columns\.shoe_size: order_lines has no column 'shoe_size'"):
        SourceMapping(entities=entities(lookup=[HEADERS.model_copy(update={"columns": {"shoe_size": "S"}})]))
    with pytest.raises(ValueError, match="'customer_id' is filled by columns too"):
        SourceMapping(entities=entities(columns={"customer_id": "Cust"}, lookup=[HEADERS]))
    with pytest.raises(ValueError, match="needs exactly one of files or query"):
        Lookup(what="x", key={"a": "a"}, columns={"b": "b"})
    with pytest.raises(ValueError, match="absolute path"):
        Lookup(what="x", files="/etc/passwd", key={"a": "a"}, columns={"b": "b"})
    with pytest.raises(ValueError, match="customers.discount: only order_lines have it"):
        SourceMapping(entities={"customers": EntitySource(files="c.csv", discount={"column": "d"}),
                                "order_lines": EntitySource(files="l.csv")})
    mapping = SourceMapping(entities=entities(lookup=[HEADERS]))
    assert {"customer_id", "order_ts"} <= mapping.entities["order_lines"].provided()


def test_a_normalized_export_ingests_with_the_hand_worked_answers(tmp_path):
    mapping_path, _ = write_normalized_export(tmp_path, customers=20, orders=30)
    frames, sources = ingest_all(load_mapping(mapping_path), tmp_path, AS_OF)
    lines = frames["order_lines"]
    assert len(lines) == (tmp_path / "landing" / "order_details.csv").read_text().count("\n") - 1  # a row a line
    good = lines[lines[PARSE_ERRORS].isna()]
    paid = (good["unit_price"] * good["quantity"]).groupby(good["customer_id"]).sum()
    for customer, revenue in HAND_REVENUE.items():
        assert paid[customer] == pytest.approx(revenue)
    problems = dict(zip(lines.loc[lines[PARSE_ERRORS].notna(), "order_id"],
                        lines.loc[lines[PARSE_ERRORS].notna(), PARSE_ERRORS], strict=True))
    assert problems == {ORPHAN_ORDER: f"no order header '{ORPHAN_ORDER}' in orders.csv",
                        REPEATED_ORDER: f"order header '{REPEATED_ORDER}' is not unique in orders.csv (2 rows: "
                                        "line 3, line 4)"}
    products = frames["products"].set_index("product_id")["category"]
    assert products[list(HAND_CATEGORIES)].to_dict() == HAND_CATEGORIES
    assert sources["order_lines"]["lookups"]["tables"] == {"order header": {"rows": 36, "files": 1,
                                                                            "repeated_keys": 1}}
    assert sources["order_lines"]["lookups"]["problem_rows"] == 2


def test_a_missing_key_column_is_one_line_naming_the_file(tmp_path):
    mapping_path, tables = write_normalized_export(tmp_path, customers=5, orders=5)
    tables["orders"].drop(columns="OrderDate").to_csv(tmp_path / "landing" / "orders.csv", index=False)
    with pytest.raises(SourceSchemaError, match=r"lookup 'order header': .*orders.csv lacks column\(s\) "
                                                r"\['OrderDate'\]"):
        ingest_all(load_mapping(mapping_path), tmp_path, AS_OF)


# ---- daily header and line files ------------------------------------------------------------------------------
def _daily_export(root: Path, days: list[str]) -> Path:
    """Header and line files per day (``daily/<day>_orders.csv``, ``daily/<day>_lines.csv``), every order with
    one header."""
    tables = normalized_tables(customers=10, orders=40)
    header, lines = tables["orders"], tables["order_details"]
    header = header[~header["OrderID"].isin([ORPHAN_ORDER, REPEATED_ORDER])].drop_duplicates("OrderID")
    lines = lines[lines["OrderID"].isin(header["OrderID"])]
    landing = root / "landing"
    (landing / "daily").mkdir(parents=True, exist_ok=True)
    for name in ("customers", "products", "categories"):
        tables[name].to_csv(landing / f"{name}.csv", index=False)
    day_of = dict(zip(header["OrderID"], np.array(days)[np.arange(len(header)) % len(days)], strict=True))
    for day in days:
        in_day = [o for o, d in day_of.items() if d == day]
        header[header["OrderID"].isin(in_day)].to_csv(landing / "daily" / f"{day}_orders.csv", index=False)
        lines[lines["OrderID"].isin(in_day)].to_csv(landing / "daily" / f"{day}_lines.csv", index=False)
    mapping = root / "daily.yaml"
    mapping.write_text(MAPPING.format(landing=landing, details="daily/*_lines.csv", orders="daily/*_orders.csv",
                                      daily="true"))
    return mapping


def _history(frames: dict, sources: dict) -> dict[str, History]:
    read = sources["order_lines"]
    return {"order_lines": History(frames["order_lines"], read["files"], read.get("lookups"))}


def test_daily_header_and_line_files_read_incrementally_equal_a_full_read(tmp_path):
    mapping = load_mapping(_daily_export(tmp_path, ["2025-06-01", "2025-06-02", "2025-06-03"]))
    day1, sources1 = ingest_all(mapping, tmp_path, date(2025, 6, 2))
    assert set(day1["order_lines"][SOURCE_FILE]) == {"daily/2025-06-01_lines.csv", "daily/2025-06-02_lines.csv"}
    day2, sources2 = ingest_all(mapping, tmp_path, date(2025, 6, 3), history=_history(day1, sources1))
    full, _ = ingest_all(mapping, tmp_path, date(2025, 6, 3))
    assert sources2["order_lines"]["mode"] == "incremental" and sources2["order_lines"]["new_files"] == 1
    pd.testing.assert_frame_equal(day2["order_lines"], full["order_lines"])
    assert full["order_lines"][PARSE_ERRORS].isna().all()


def test_lines_that_arrived_before_their_header_are_read_again_when_it_comes(tmp_path):
    days = ["2025-06-01", "2025-06-02", "2025-06-03"]
    mapping = load_mapping(_daily_export(tmp_path, days))
    late = tmp_path / "landing" / "daily" / "2025-06-02_orders.csv"
    late.rename(tmp_path / "held_back.csv")  # 06-02's lines arrive before their headers
    day1, sources1 = ingest_all(mapping, tmp_path, date(2025, 6, 2))
    waiting = day1["order_lines"][PARSE_ERRORS].notna()
    assert waiting.sum() > 0 and sources1["order_lines"]["lookups"]["problem_rows"] == waiting.sum()
    assert day1["order_lines"].loc[waiting, SOURCE_FILE].eq("daily/2025-06-02_lines.csv").all()
    (tmp_path / "held_back.csv").rename(late)  # the headers land the next day; the line files are unchanged
    day2, sources2 = ingest_all(mapping, tmp_path, date(2025, 6, 3), history=_history(day1, sources1))
    assert sources2["order_lines"]["mode"] == "full"  # yesterday's waiting lines are looked up again
    assert day2["order_lines"][PARSE_ERRORS].isna().all()
    day3, sources3 = ingest_all(mapping, tmp_path, date(2025, 6, 3), history=_history(day2, sources2))
    assert sources3["order_lines"]["mode"] == "incremental"  # nothing waits any more
    pd.testing.assert_frame_equal(day3["order_lines"], day2["order_lines"])


# ---- the real flow --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_normalized_five_file_export_through_the_real_flow(tmp_path, prefect_server):
    from flows.customer_analytics import customer_analytics

    mapping, tables = write_normalized_export(tmp_path)
    # A fixed hand-made history, not tonight's feed: its end before AS_OF is reported, not fatal.
    options = PipelineOptions(data_root=str(tmp_path), mapping=str(mapping), freshness={"on_stale": "warn"})
    customer_analytics(as_of=AS_OF, options=options)
    folder = tmp_path / "runs" / f"as_of={AS_OF}"
    manifest = json.loads((folder / "_manifest.json").read_text())
    lines_in = len(tables["order_details"])
    assert manifest["reconciliation"]["order_lines"] == {"rows_in": lines_in, "valid": lines_in - 2, "quarantined": 2,
                                                         "data_lines": lines_in, "lines_in": lines_in,
                                                         "lines_quarantined": 2}
    lookups = manifest["inputs"]["entities"]["order_lines"]["lookups"]
    assert lookups == {"order header": {"rows": len(tables["orders"]), "files": 1, "repeated_keys": 1},
                       "rows_without_single_match": 2}

    quarantine = pd.read_parquet(folder / "quarantine" / "order_lines.parquet").set_index("order_id")
    assert quarantine.loc[ORPHAN_ORDER, SOURCE_LINE] == 4 and quarantine.loc[REPEATED_ORDER, SOURCE_LINE] == 5
    assert f"no order header '{ORPHAN_ORDER}' in orders.csv" in quarantine.loc[ORPHAN_ORDER, QUARANTINE_REASON]
    assert (f"order header '{REPEATED_ORDER}' is not unique in orders.csv (2 rows: line 3, line 4)"
            in quarantine.loc[REPEATED_ORDER, QUARANTINE_REASON])

    expected = expected_answers(tables)
    clean = pd.read_parquet(folder / "clean" / "order_lines.parquet")
    revenue = clean.groupby("customer_id")["line_amount"].sum()
    assert revenue[list(HAND_REVENUE)].round(2).to_dict() == {c: round(v, 2) for c, v in HAND_REVENUE.items()}
    assert np.allclose(revenue.loc[list(expected["revenue"])], pd.Series(expected["revenue"]), atol=1e-3)
    orders = clean.groupby("customer_id")["order_id"].nunique()
    assert orders[list(HAND_ORDER_COUNTS)].to_dict() == HAND_ORDER_COUNTS
    assert orders.to_dict() == expected["orders"]
    products = pd.read_parquet(folder / "clean" / "products.parquet").set_index("product_id")["category"]
    assert products.to_dict() == expected["categories"]
    assert products[list(HAND_CATEGORIES)].to_dict() == HAND_CATEGORIES


# ---- several sources for one entity ---------------------------------------------------------------------------
SEVERAL = """\
name: two-customer-sources
landing_dir: {landing}
entities:
  customers:
    sources:
      shop:
        files: shop_customers.csv
        columns: {{customer_id: id, email: mail, country: land}}
      loyalty:
        files: "loyalty/*.csv"
        columns: {{customer_id: member_no, email: EMail, signup_date: joined}}
        formats: {{signup_date: "%d.%m.%Y"}}
        regex_replace: {{customer_id: {{pattern: "^", repl: "L-"}}}}   # member numbers and shop ids may collide
        keep: [tier]
  order_lines:
    files: lines.csv
"""


def test_several_sources_of_one_entity_are_unioned_with_their_name_and_own_columns(tmp_path):
    landing = tmp_path / "landing"
    (landing / "loyalty").mkdir(parents=True)
    (landing / "shop_customers.csv").write_text("id,mail,land\n1,a@example.com,DE\n2,b@example.com,FR\n")
    (landing / "loyalty" / "members.csv").write_text("member_no,EMail,joined,tier\n1,c@example.com,02.03.2024,gold\n"
                                                     "7,d@example.com,31.02.2024,silver\n")
    (landing / "lines.csv").write_text("order_id,customer_id,order_ts,product_id,quantity,unit_price\n"
                                       "o1,1,2025-01-02,p,1,2.5\no2,L-1,2025-01-03,p,2,2.5\n")
    (tmp_path / "several.yaml").write_text(SEVERAL.format(landing=landing))
    mapping = load_mapping(tmp_path / "several.yaml")
    assert mapping.source("customers").pii == ["email"] and mapping.column_types("customers")["source"] == "string"
    frames, sources = ingest_all(mapping, tmp_path, AS_OF)
    customers = frames["customers"]
    assert customers["customer_id"].tolist() == ["1", "2", "L-1", "L-7"]
    assert customers["source"].tolist() == ["shop", "shop", "loyalty", "loyalty"]
    assert customers[SOURCE_FILE].tolist() == ["shop_customers.csv"] * 2 + ["loyalty/members.csv"] * 2
    assert customers[SOURCE_LINE].tolist() == [2, 3, 2, 3]
    assert customers["country"].tolist()[:2] == ["DE", "FR"] and customers["country"].iloc[2:].isna().all()
    assert customers["tier"].tolist() == [pd.NA, pd.NA, "gold", "silver"]  # kept by one source, empty in the other
    assert customers["signup_date"].iloc[2] == pd.Timestamp("2024-03-02", tz="UTC")
    assert customers[PARSE_ERRORS].tolist()[3] == "signup_date='31.02.2024'"  # its own format, its own errors
    assert sources["customers"]["mode"] == "sources" and set(sources["customers"]["sources"]) == {"shop", "loyalty"}
    assert ingest_metrics(customers, "customers", mapping.source("customers"))["rows_by_source"] == {
        "shop": 2, "loyalty": 2}
    checked = validate_all(frames, mapping, AS_OF, ValidationOptions(cross_check_rows=0))  # GX alone costs 15 s
    outcomes = publishable_outcomes(checked, mapping, b"k" * 32)
    written = pd.concat([outcomes["customers"].valid, outcomes["customers"].quarantine])
    assert "email" not in written.columns and written["email_pseudonym"].notna().all()  # both sources' e-mails
    assert outcomes["order_lines"].quarantine.empty  # L-1 is the loyalty member, 1 the shop customer

    (tmp_path / "bad.yaml").write_text(SEVERAL.format(landing=landing).replace("keep: [tier]", "keep: [tier]\n"
                                                                               "        pii: [shoe_size]"))
    with pytest.raises(ValueError, match=r"entities\.customers\.sources\.loyalty\.pii: customers has no column "
                                         "'shoe_size'"):
        load_mapping(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="an entity with sources takes its rows from them"):
        EntitySource(files="x.csv", sources={"a": EntitySource(files="a.csv")})


def test_the_readme_examples_load(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    northwind = readme.split("```yaml\nname: northwind\n", 1)[1].split("```", 1)[0]
    (tmp_path / "northwind.yaml").write_text("name: northwind\n" + northwind)
    mapping = load_mapping(tmp_path / "northwind.yaml")
    assert [lookup.what for lookup in mapping.entities["order_lines"].lookup] == ["order header"]
    assert mapping.entities["order_lines"].discount.kind == "fraction"
    several = readme.split("```yaml\n  customers:\n    sources:\n", 1)[1].split("```", 1)[0]
    (tmp_path / "several.yaml").write_text("entities:\n  customers:\n    sources:\n" + several
                                           + "  order_lines: {files: lines.csv}\n")
    identity = load_mapping(tmp_path / "several.yaml").source("customers").identity
    assert list(identity.keys) == ["member_id", "email", "phone"] and identity.precedence == ["loyalty", "shop"]


def test_a_lookup_may_use_a_column_an_earlier_lookup_brought(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "products.csv").write_text("sku,sub\np1,s1\np2,s2\np3,s9\n")
    (landing / "subcategories.csv").write_text("sub,cat\ns1,c1\ns2,c2\n")
    (landing / "categories.csv").write_text("cat,name\nc1,Tea\nc2,Coffee\n")
    mapping = SourceMapping.model_validate({"landing_dir": str(landing), "entities": {
        "customers": {"files": "c.csv"}, "order_lines": {"files": "l.csv"},
        "products": {"files": "products.csv", "columns": {"product_id": "sku"}, "keep": ["category_id"],
                     "lookup": [{"what": "subcategory", "files": "subcategories.csv", "key": {"sub": "sub"},
                                 "columns": {"category_id": "cat"}},
                                {"what": "category", "files": "categories.csv", "key": {"category_id": "cat"},
                                 "columns": {"category": "name"}}]}}})
    products = parse_files("products", mapping, landing, AS_OF, [landing / "products.csv"])
    assert products["category"].tolist() == ["Tea", "Coffee", pd.NA]
    assert products[PARSE_ERRORS].tolist() == [pd.NA, pd.NA, "no subcategory 's9' in subcategories.csv; no "
                                               "category: category_id is empty"]
