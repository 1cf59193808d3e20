"""Sources other than the sample export: derived entities, SQL (SQLite and a real PostgreSQL), retries."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from crm_analytics.mapping import MappingError, load_mapping
from crm_analytics.parameters import RunSpec
from tasks.common import SourceSchemaError
from tasks.ingest import ingest_all

AS_OF = date(2025, 1, 31)

CUSTOMERS = pd.DataFrame({"cid": ["c1", "c2"], "joined": ["2024-05-01 10:00:00", "2024-06-01 11:00:00"],
                          "mail": ["ann@example.org", "bob@example.org"]})
PRODUCTS = pd.DataFrame({"sku": ["p1", "p2"], "cat": ["home", "toys"]})
LINES = pd.DataFrame({
    "invoice": ["o1", "o1", "o2", "o3"],
    "cid": ["c1", "c1", "c2", "c2"],
    "ts": ["2025-01-05 09:00:00", "2025-01-05 09:00:00", "2025-01-20 12:30:00", "2025-02-03 08:00:00"],
    "sku": ["p1", "p2", "p1", "p2"],
    "qty": [1, 2, 3, 1],
    "price": [2.5, 4.0, 2.5, 4.0],
})


def _sql_mapping(tmp_path: Path) -> Path:
    mapping = {
        "name": "sql-test",
        "database": {"url_env": "TEST_CRM_DB_URL"},
        "entities": {
            "customers": {"query": "SELECT cid, joined, mail FROM customers",
                          "columns": {"customer_id": "cid", "signup_date": "joined", "email": "mail"},
                          "pii": ["email"]},
            "products": {"query": "SELECT sku, cat FROM products",
                         "columns": {"product_id": "sku", "category": "cat"}},
            "order_lines": {"query": "SELECT invoice, cid, ts, sku, qty, price FROM order_lines ORDER BY invoice, sku",
                            "columns": {"order_id": "invoice", "customer_id": "cid", "order_ts": "ts",
                                        "product_id": "sku", "quantity": "qty", "unit_price": "price"}},
        },
    }
    path = tmp_path / "sql.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _load_tables(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        CUSTOMERS.to_sql("customers", connection, index=False, if_exists="replace")
        PRODUCTS.to_sql("products", connection, index=False, if_exists="replace")
        LINES.to_sql("order_lines", connection, index=False, if_exists="replace")
    engine.dispose()


def _check_sql_ingest(frames: dict[str, pd.DataFrame]) -> None:
    lines = frames["order_lines"]
    assert len(lines) == 4
    assert lines["order_ts"].iloc[2] == pd.Timestamp("2025-01-20 12:30:00", tz="UTC")
    assert lines["quantity"].tolist() == [1, 2, 3, 1] and lines["unit_price"].tolist() == [2.5, 4.0, 2.5, 4.0]
    assert lines["_source_file"].unique().tolist() == ["sql:order_lines"]
    assert frames["customers"]["email"].tolist() == ["ann@example.org", "bob@example.org"]  # raw keeps PII
    assert frames["products"]["category"].tolist() == ["home", "toys"]


def test_sqlite_source_through_a_mapping(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _load_tables(url)
    monkeypatch.setenv("TEST_CRM_DB_URL", url)
    _check_sql_ingest(ingest_all(load_mapping(_sql_mapping(tmp_path)), tmp_path, AS_OF)[0])


def test_missing_database_url_is_a_clear_mapping_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_CRM_DB_URL", raising=False)
    with pytest.raises(MappingError, match="TEST_CRM_DB_URL is not set"):
        ingest_all(load_mapping(_sql_mapping(tmp_path)), tmp_path, AS_OF)


# ---- a real PostgreSQL server, started by the test on loopback ------------------------------------------------
@pytest.fixture(scope="module")
def postgres_url():
    from crm_analytics.production import postgres_unavailable, start_postgres

    if reason := postgres_unavailable():
        pytest.skip(f"{reason} (.ci/run installs Debian's postgresql)")
    server = start_postgres()
    try:
        yield server.url("psycopg"), server.password
    finally:
        server.stop()


def test_postgresql_source_through_a_mapping(tmp_path, monkeypatch, postgres_url):
    url, password = postgres_url
    _load_tables(url)
    monkeypatch.setenv("TEST_CRM_DB_URL", url)
    frames, _ = ingest_all(load_mapping(_sql_mapping(tmp_path)), tmp_path, AS_OF)
    _check_sql_ingest(frames)
    for frame in frames.values():  # the credential never lands in what ingest produces
        assert not frame.astype("string").apply(lambda c: c.str.contains(password, regex=False)).any().any()


def test_postgresql_query_can_bound_by_the_as_of_date(tmp_path, monkeypatch, postgres_url):
    url, _ = postgres_url
    _load_tables(url)
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE order_lines ALTER COLUMN ts TYPE timestamptz USING ts::timestamptz"))
    engine.dispose()
    path = _sql_mapping(tmp_path)
    mapping = yaml.safe_load(path.read_text())
    mapping["entities"]["order_lines"]["query"] = (
        "SELECT invoice, cid, ts, sku, qty, price FROM order_lines WHERE ts < :as_of_end ORDER BY invoice, sku")
    path.write_text(yaml.safe_dump(mapping))
    monkeypatch.setenv("TEST_CRM_DB_URL", url)
    lines = ingest_all(load_mapping(path), tmp_path, AS_OF)[0]["order_lines"]
    assert lines["order_id"].tolist() == ["o1", "o1", "o2"]  # o3 is dated after the as-of date


# ---- derived entities -----------------------------------------------------------------------------------------
def test_customers_and_products_are_derived_from_invoice_lines(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    pd.DataFrame({
        "Invoice": ["1", "1", "2", "C3"],
        "Customer": ["17850.0", "17850.0", "13047.0", "17850.0"],
        "When": ["2010-12-01 08:26:00", "2010-12-01 08:26:00", "2010-12-02 10:00:00", "2010-12-03 09:00:00"],
        "Code": ["A", "B", "A", "A"],
        "Qty": ["6", "2", "1", "-6"],
        "Price": ["2.55", "3.39", "2.55", "2.55"],
        "Country": ["United Kingdom", "United Kingdom", "France", "United Kingdom"],
        "Desc": ["MUG ", "LANTERN", "MUG", "MUG"],
    }).to_csv(landing / "lines.csv", index=False)
    mapping = load_mapping("online_retail").model_dump(by_alias=True)
    mapping["landing_dir"] = str(landing)
    lines = mapping["entities"]["order_lines"]
    lines.update(files="lines.csv", daily=False)
    lines["columns"].update(order_id="Invoice", customer_id="Customer", order_ts="When", product_id="Code",
                            quantity="Qty", unit_price="Price", description="Desc")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(mapping))
    frames, _ = ingest_all(load_mapping(path), tmp_path, date(2010, 12, 31))
    customers = frames["customers"].set_index("customer_id")
    assert customers.index.tolist() == ["13047", "17850"]                  # the ".0" is stripped by the mapping
    assert customers.loc["17850", "signup_date"] == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    assert customers.loc["13047", "country"] == "France"
    products = frames["products"].set_index("product_id")
    assert products.loc["A", "name"] == "MUG" and products.loc["A", "category"] == "all"


def test_derivation_from_a_missing_column_names_it(tmp_path):
    mapping = load_mapping("online_retail").model_dump(by_alias=True)
    mapping["entities"]["customers"]["derive"]["columns"]["country"] = "mode:nation"
    (tmp_path / "d").mkdir()
    pd.DataFrame({"InvoiceNo": ["1"], "CustomerID": ["1"], "InvoiceDate": ["2010-12-01 08:26:00"],
                  "StockCode": ["A"], "Quantity": ["1"], "UnitPrice": ["1"], "Country": ["UK"],
                  "Description": ["x"]}).to_csv(tmp_path / "d" / "2010-12-01.csv", index=False)
    mapping["landing_dir"] = str(tmp_path / "d")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(mapping))
    with pytest.raises(MappingError, match="has no column 'nation'"):
        ingest_all(load_mapping(path), tmp_path, date(2010, 12, 31))


def test_a_landing_file_with_different_columns_is_named(tmp_path):
    landing = tmp_path / "landing" / "order_lines"
    landing.mkdir(parents=True)
    (landing / "2025-01-01.csv").write_text("order_id,customer_id,order_ts,product_id,quantity,unit_price\n")
    (landing / "2025-01-02.csv").write_text("order_id,customer,order_ts,product_id,quantity,unit_price\n")
    (tmp_path / "landing" / "customers.csv").write_text("customer_id,signup_date\n")
    (tmp_path / "landing" / "products.csv").write_text("product_id,category\n")
    with pytest.raises(SourceSchemaError, match=r"2025-01-02.csv lacks required column\(s\) \['customer_id'\]"):
        ingest_all(load_mapping("sample"), tmp_path, date(2025, 1, 2))


# ---- retries: transient errors are retried with backoff, permanent ones fail at once ---------------------------
@pytest.mark.integration
def test_transient_read_errors_are_retried_and_permanent_ones_are_not(sample_root, prefect_server, monkeypatch,
                                                                    tmp_path):
    import tasks.ingest.stage as ingest_module

    shutil.copytree(sample_root / "landing", tmp_path / "landing")  # no earlier run here: ingest must read

    real_read_files = ingest_module.read_files
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("network share dropped the connection")
        return real_read_files(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "read_files", flaky)
    fast = ingest_module.ingest.with_options(retry_delay_seconds=[0.1, 0.2, 0.4])
    result = fast(RunSpec(data_root=tmp_path, as_of=date(2025, 12, 31)), "sample")
    assert result.metrics["entities"]["order_lines"]["rows"] > 0
    assert calls["n"] >= 3  # two failures, then every entity read

    calls["n"] = 0

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise SourceSchemaError("customers.csv lacks required column 'signup_date'")

    monkeypatch.setattr(ingest_module, "read_files", broken)
    with pytest.raises(SourceSchemaError, match="signup_date"):
        fast(RunSpec(data_root=tmp_path, as_of=date(2025, 12, 30)), "sample")
    assert calls["n"] == 1
