"""Helpers shared by the segment tests: read a generated export the way the flow would see it after
validation, and turn one night's segment output into the next night's ``previous``."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.clean import CleanOutput, clean_and_merge
from tasks.features import build_customer_features
from tasks.segment import PreviousSegments, SegmentOutput


def generated_features(root: Path, as_of: date) -> tuple[CleanOutput, pd.DataFrame]:
    """Cleaned data and features as of ``as_of`` from a generated landing folder.

    A stand-in for ingest and validation (which have their own tests): rows that do not parse, have a negative
    price or a timestamp after the as-of date are dropped, as validation would quarantine them.
    """
    text = pacsv.ConvertOptions(column_types={c: pa.string() for c in
                                              ("customer_id", "order_id", "product_id", "order_ts", "signup_date")})
    customers = pacsv.read_csv(root / "landing" / "customers.csv", convert_options=text).to_pandas()
    customers["signup_date"] = pd.to_datetime(customers["signup_date"], errors="coerce", utc=True)
    customers = customers.dropna(subset=["signup_date"])
    products = pacsv.read_csv(root / "landing" / "products.csv").to_pandas()
    files = sorted((root / "landing" / "order_lines").glob("*.csv"))
    lines = pd.concat([pacsv.read_csv(f, convert_options=text).to_pandas() for f in files], ignore_index=True)
    lines["order_ts"] = pd.to_datetime(lines["order_ts"], errors="coerce", format="%Y-%m-%d %H:%M:%S", utc=True)
    lines["quantity"] = pd.to_numeric(lines["quantity"], errors="coerce")
    lines["unit_price"] = pd.to_numeric(lines["unit_price"], errors="coerce")
    lines = lines[lines.notna().all(axis=1) & (lines["unit_price"] >= 0)
                  & (lines["order_ts"] < pd.Timestamp(as_of + timedelta(days=1), tz="UTC"))].astype(
        {"quantity": "int64"})
    cleaned = clean_and_merge(customers, products, lines)
    return cleaned, build_customer_features(cleaned.customers, cleaned.order_lines, as_of)


def previous_of(out: SegmentOutput, as_of: date = date(2025, 1, 1)) -> PreviousSegments:
    return PreviousSegments(as_of, out.assignments, out.profiles, out.centroids, out.identity)
