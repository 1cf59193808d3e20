"""Clean and merge: drop exact duplicates, normalise products, flag returns, and join order lines with their
customer and product without multiplying rows. Every dropped row is counted for the manifest."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from prefect import task

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec
from crm_analytics.schema import LINEAGE_COLUMNS
from tasks.common import stage_logger


class CleanOutput(NamedTuple):
    customers: pd.DataFrame
    products: pd.DataFrame
    order_lines: pd.DataFrame
    stats: dict[str, dict[str, float | int]]


def drop_exact_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows equal to an earlier row in every data column (lineage columns are ignored)."""
    data_columns = [c for c in frame.columns if c not in LINEAGE_COLUMNS]
    duplicate = frame.duplicated(subset=data_columns, keep="first")
    return frame[~duplicate].drop(columns=list(LINEAGE_COLUMNS), errors="ignore").reset_index(drop=True), int(
        duplicate.sum())


def normalise_products(products: pd.DataFrame) -> pd.DataFrame:
    """One row per product; names trimmed and, where a product has several spellings, the most frequent."""
    products = products.assign(name=products["name"].str.strip().str.replace(r"\s+", " ", regex=True))
    counts = products.groupby(["product_id", "name"], dropna=False).size().rename("n").reset_index()
    top_name = counts.sort_values(["product_id", "n", "name"], ascending=[True, False, True]).drop_duplicates(
        "product_id")[["product_id", "name"]]
    return products.drop(columns="name").drop_duplicates("product_id").merge(top_name, on="product_id",
                                                                            validate="one_to_one")


def clean_and_merge(customers: pd.DataFrame, products: pd.DataFrame, order_lines: pd.DataFrame) -> CleanOutput:
    customers, customer_dupes = drop_exact_duplicates(customers)
    products, product_dupes = drop_exact_duplicates(products)
    products = normalise_products(products)
    lines, line_dupes = drop_exact_duplicates(order_lines)

    lines = lines.assign(
        is_return=lines["quantity"] < 0,
        line_amount=(lines["quantity"].astype("float64") * lines["unit_price"]).round(4),
    )
    before = len(lines)
    lines = lines.merge(products[["product_id", "category"]], on="product_id", how="left", validate="many_to_one")
    if len(lines) != before:
        raise AssertionError(f"joining products multiplied order lines: {before} -> {len(lines)}")
    lines = lines.sort_values(["order_ts", "order_id", "product_id"], kind="stable", ignore_index=True)

    purchased = lines.loc[~lines["is_return"], "line_amount"].sum()
    returned = -lines.loc[lines["is_return"], "line_amount"].sum()
    stats = {
        "customers": {"rows_in": len(customers) + customer_dupes, "exact_duplicates_dropped": customer_dupes,
                      "rows_out": len(customers)},
        "products": {"rows_in": len(products) + product_dupes, "exact_duplicates_dropped": product_dupes,
                     "rows_out": len(products)},
        "order_lines": {
            "rows_in": before + line_dupes,
            "exact_duplicates_dropped": line_dupes,
            "rows_out": len(lines),
            "return_lines": int(lines["is_return"].sum()),
            "return_rate_by_value": float(np.round(returned / purchased, 6)) if purchased else 0.0,
        },
    }
    return CleanOutput(customers, products, lines, stats)


def cleaning_section(stats: dict[str, dict[str, float | int]]) -> str:
    lines = stats["order_lines"]
    return (f"Cleaning dropped {lines['exact_duplicates_dropped']} exact duplicate order lines, "
            f"{stats['customers']['exact_duplicates_dropped']} duplicate customers and "
            f"{stats['products']['exact_duplicates_dropped']} duplicate products; {lines['return_lines']} lines are "
            f"returns (return rate by value {lines['return_rate_by_value']:.2%}).")


@task(name="clean")
def clean(run: RunSpec, validated: StageResult) -> StageResult:
    store = run.store
    out = clean_and_merge(*(store.read_frame(validated.ref(e)) for e in ("customers", "products", "order_lines")))
    stage_logger().info("cleaned: %s", out.stats["order_lines"])
    artifacts = {
        "customers": store.write_frame("clean", "customers", out.customers),
        "products": store.write_frame("clean", "products", out.products),
        "order_lines": store.write_frame("clean", "order_lines", out.order_lines),
    }
    return StageResult(stage="clean", artifacts=artifacts, metrics=out.stats,
                       report_section=cleaning_section(out.stats))
