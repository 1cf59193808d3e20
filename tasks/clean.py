"""Clean and merge: drop exact duplicates, normalise products, net returns against their purchases, and join
order lines with their customer and product without multiplying rows. Every dropped row is counted.

Returns and cancellations (negative quantity: ``R`` orders in the sample export, ``C`` invoices in Online
Retail, neither reliably linked to the original order) are kept as lines and netted against the same
customer's earlier purchases of the same product:

- ``netted_quantity`` on a return line: the units of it that a purchase made *before it* can absorb. It depends
  only on lines up to the return's own timestamp, so features computed at any past cutoff may use it.
- ``returned_quantity`` on a purchase line: the units of it given back by any return up to the as-of date,
  allocated first-in first-out. It knows the future of that purchase: features at a past cutoff must not use it.
- A return no earlier purchase can absorb (its purchase predates the export, or it is a discount or fee line)
  is ``unmatched``: kept, flagged and counted, but it nets against nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.artifacts import StageResult
from crm_analytics.distributed import executor_metrics, read_parts_on, stage_client
from crm_analytics.frames import exact_duplicate_rows, without_rows
from crm_analytics.mapping import load_mapping, mapping_fingerprint
from crm_analytics.parameters import RunSpec
from crm_analytics.partitions import checked_partitions, partition_count_for, split_by_customer
from crm_analytics.reporting import markdown_table
from crm_analytics.schema import LINEAGE_COLUMNS
from tasks.common import stage_logger, stage_task
from tasks.identity import identity_section, resolve_identity

# The clean order lines' row order (each partition is in it; reading the whole table restores it over them).
CLEAN_LINE_ORDER = ["order_ts", "order_id", "product_id"]
LINE_KEY_COLUMNS = ["order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"]
# Customer attributes copied onto every order line (when the customers table has them and the lines do not).
CUSTOMER_COLUMNS_ON_LINES = ["country"]
# A product description carried on the lines themselves (Online Retail's) is replaced by the product's one
# normalised name, so every line of a product reads the same.
LINE_DESCRIPTION = "description"
Stats = dict[str, dict[str, float | int]]


class CleanOutput(NamedTuple):
    customers: pd.DataFrame
    products: pd.DataFrame
    order_lines: pd.DataFrame
    stats: Stats


def drop_exact_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows equal to an earlier row in every data column (lineage columns are ignored)."""
    data_columns = [c for c in frame.columns if c not in LINEAGE_COLUMNS]
    duplicate = exact_duplicate_rows(frame, data_columns)
    return frame[~duplicate].drop(columns=list(LINEAGE_COLUMNS), errors="ignore").reset_index(drop=True), int(
        duplicate.sum())


def _squash_spaces(text: pd.Series) -> pd.Series:
    return text.str.strip().str.replace(r"\s+", " ", regex=True)


def normalise_products(products: pd.DataFrame) -> pd.DataFrame:
    """One row per product; names trimmed and, where a product has several spellings, the most frequent."""
    products = products.assign(category=_squash_spaces(products["category"]))
    if "name" not in products.columns:
        return products.drop_duplicates("product_id").reset_index(drop=True)
    products = products.assign(name=_squash_spaces(products["name"]))
    counts = products.groupby(["product_id", "name"], dropna=False).size().rename("n").reset_index()
    top_name = counts.sort_values(["product_id", "n", "name"], ascending=[True, False, True]).drop_duplicates(
        "product_id")[["product_id", "name"]]
    return products.drop(columns="name").drop_duplicates("product_id").merge(top_name, on="product_id",
                                                                            validate="one_to_one")


def _codes(values: pd.Series) -> np.ndarray:
    return pd.factorize(values, sort=False)[0].astype(np.int64)


def net_returns(lines: pd.DataFrame, customer_code: np.ndarray | None = None,
                product_code: np.ndarray | None = None) -> pd.DataFrame:
    """Add ``netted_quantity`` and ``returned_quantity`` (see the module docstring); vectorised.

    Per (customer, product) in time order (a purchase before a return at the same instant), with P the running
    purchased units and R the running returned units, the running matched returns are
    M = R + min(0, cummin(P - R)): a return is matched only as far as earlier purchases not yet returned allow.
    First-in first-out, purchase line k (units [P_k - q_k, P_k)) then gives back clip(M_total - P_k + q_k, 0, q_k).
    ``customer_code`` and ``product_code`` (integer codes of the ids, if the caller has them) save factorising.
    """
    customer_code = _codes(lines["customer_id"]) if customer_code is None else customer_code
    product_code = _codes(lines["product_id"]) if product_code is None else product_code
    quantity = lines["quantity"].to_numpy(dtype=np.int64)
    is_return = quantity < 0
    ts = lines["order_ts"].to_numpy(dtype="datetime64[us]").astype(np.int64)
    # Two combined keys sort faster than four: (customer, product), then (time, purchase before return).
    pair = customer_code * (int(product_code.max(initial=0)) + 1) + product_code
    order = np.lexsort((ts * 2 + is_return, pair))
    customer, product = customer_code[order], product_code[order]
    group_start = np.ones(len(order), dtype=bool)
    group_start[1:] = (customer[1:] != customer[:-1]) | (product[1:] != product[:-1])
    group = np.cumsum(group_start) - 1

    def running(values: np.ndarray) -> np.ndarray:
        total = np.cumsum(values)
        return total - (total - values)[group_start][group]

    bought = np.where(is_return, 0, quantity)[order]
    given_back = np.where(is_return, -quantity, 0)[order]
    purchased, returned = running(bought), running(given_back)
    slack = pd.Series(purchased - returned).groupby(group).cummin().to_numpy()
    matched = returned + np.minimum(slack, 0)
    matched_here = matched - np.where(group_start, 0, np.roll(matched, 1))
    group_end = np.r_[group_start[1:], True] if len(order) else group_start
    matched_total = matched[group_end][group]
    returned_here = np.clip(matched_total - purchased + bought, 0, bought)

    netted = np.empty(len(order), dtype=np.int64)
    netted[order] = np.where(given_back > 0, matched_here, 0)
    returned_quantity = np.empty(len(order), dtype=np.int64)
    returned_quantity[order] = returned_here
    return lines.assign(netted_quantity=netted, returned_quantity=returned_quantity)


def key_positions(keys: pd.Series, table_keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of ``keys`` and, for each, the row of ``table_keys`` holding it (-1 if absent or null).

    Ids are factorised once and only the distinct ones are looked up (with pyarrow's hash lookup: pandas'
    ``isin`` on Arrow strings loops in Python). The table must hold each key once, so that joining by these
    positions is many-to-one and cannot multiply rows.
    """
    if table_keys.duplicated().any():
        raise AssertionError(f"join key {table_keys.name!r} is not unique in its table: the join would multiply rows")
    codes, uniques = pd.factorize(keys, sort=False)
    value_set = pa.array(table_keys.astype("string"), type=pa.string())
    found = pc.index_in(pa.array(pd.Series(uniques).astype("string"), type=pa.string()), value_set=value_set)
    by_unique = found.fill_null(-1).to_numpy().astype(np.int64)
    return codes.astype(np.int64), np.where(codes >= 0, by_unique[np.maximum(codes, 0)], -1)


def _take(table: pd.DataFrame, columns: list[str], positions: np.ndarray) -> dict[str, pd.Series]:
    """``columns`` of ``table`` at ``positions`` (all found), as Series with a fresh index."""
    return {c: table[c].take(positions).reset_index(drop=True) for c in columns}


class CleanDimensions(NamedTuple):
    customers: pd.DataFrame
    products: pd.DataFrame
    stats: Stats


def clean_dimensions(customers: pd.DataFrame, products: pd.DataFrame) -> CleanDimensions:
    """Deduplicate customers (the first row of an id wins) and normalise products; counts what was dropped.

    A step over whole tables: the partitioned path runs it once, not per partition (both tables are small next
    to the order lines, and a product's most frequent name needs every row of it).
    """
    customers, customer_dupes = drop_exact_duplicates(customers)
    conflicting = customers["customer_id"].duplicated(keep="first")
    customers = customers[~conflicting.to_numpy()].reset_index(drop=True)
    products, product_dupes = drop_exact_duplicates(products)
    products_before = len(products)
    products = normalise_products(products)
    stats = {
        "customers": {"rows_in": len(customers) + customer_dupes + int(conflicting.sum()),
                      "exact_duplicates_dropped": customer_dupes,
                      "conflicting_duplicates_dropped": int(conflicting.sum()), "rows_out": len(customers)},
        "products": {"rows_in": products_before + product_dupes, "exact_duplicates_dropped": product_dupes,
                     "conflicting_duplicates_dropped": products_before - len(products), "rows_out": len(products)},
    }
    return CleanDimensions(customers, products, stats)


def clean_order_lines(order_lines: pd.DataFrame, customers: pd.DataFrame,
                      products: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Deduplicate order lines, drop incomplete and orphan ones, net returns and join the clean ``customers`` and
    ``products``; returns the lines (sorted by time, order, product) and the counts of what was dropped.

    Every step is per customer (an exact duplicate, and a return's purchases, have the line's own customer), so
    the lines may be split by customer, each part cleaned with its customers, and the parts concatenated.
    """
    lines, line_dupes = drop_exact_duplicates(order_lines)
    deduplicated = len(lines)

    incomplete = (lines[LINE_KEY_COLUMNS].isna().any(axis=1) | (lines["quantity"] == 0).fillna(False)).to_numpy()
    customer_code, customer_row = key_positions(lines["customer_id"], customers["customer_id"])
    product_code, product_row = key_positions(lines["product_id"], products["product_id"])
    unknown_customer = ~incomplete & (customer_row < 0)
    unknown_product = ~incomplete & ~unknown_customer & (product_row < 0)
    keep = ~(incomplete | unknown_customer | unknown_product)
    lines = lines[keep].reset_index(drop=True)

    lines = net_returns(lines, customer_code[keep], product_code[keep])
    quantity = lines["quantity"].to_numpy(dtype=np.int64)
    # Joins by the positions found above: one row of products and of customers per line, by construction.
    extra = [c for c in CUSTOMER_COLUMNS_ON_LINES if c in customers.columns and c not in lines.columns]
    joined = pd.DataFrame({**_take(products, ["category"], product_row[keep]),
                           **_take(customers, extra, customer_row[keep])})
    if len(joined) != len(lines):
        raise AssertionError(f"joining customers and products multiplied order lines: {len(lines)} -> {len(joined)}")
    if LINE_DESCRIPTION in lines.columns and "name" in products.columns:
        lines = lines.drop(columns=LINE_DESCRIPTION)
        joined[LINE_DESCRIPTION] = _take(products, ["name"], product_row[keep])["name"]
    lines = pd.concat([lines.assign(
        is_return=quantity < 0,
        line_amount=(quantity * lines["unit_price"].to_numpy(dtype=np.float64)).round(4),
        unmatched_return=(quantity < 0) & (lines["netted_quantity"].to_numpy() < -quantity),
    ), joined], axis=1)
    lines = sort_clean_lines(lines)
    counts = {
        "rows_in": deduplicated + line_dupes,
        "exact_duplicates_dropped": line_dupes,
        "incomplete_dropped": int(incomplete.sum()),
        "unknown_customer_dropped": int(unknown_customer.sum()),
        "unknown_product_dropped": int(unknown_product.sum()),
        "rows_out": len(lines),
    }
    return lines, counts


def sort_clean_lines(lines: pd.DataFrame) -> pd.DataFrame:
    """The clean order lines' row order: by time, order and product (stable)."""
    return lines.sort_values(CLEAN_LINE_ORDER, kind="stable", ignore_index=True)


def clean_stats(dimensions: Stats, line_counts: dict[str, int], returns: dict[str, float | int]) -> Stats:
    """The stage's counts per entity (``returns``: ``return_stats`` of the clean lines); checks that every row
    in is either out or counted as dropped."""
    stats = {**dimensions, "order_lines": {**line_counts, **returns}}
    for entity, counts in stats.items():
        dropped = sum(v for k, v in counts.items() if k.endswith("_dropped"))
        if counts["rows_in"] != counts["rows_out"] + dropped:
            raise AssertionError(f"{entity}: {counts['rows_in']} rows in != {counts['rows_out']} out + {dropped} "
                                 "dropped")
    return stats


def clean_and_merge(customers: pd.DataFrame, products: pd.DataFrame, order_lines: pd.DataFrame) -> CleanOutput:
    """Deduplicate, normalise, net returns and join; ``stats`` reconciles every dropped row per entity."""
    dimensions = clean_dimensions(customers, products)
    lines, counts = clean_order_lines(order_lines, dimensions.customers, dimensions.products)
    return CleanOutput(dimensions.customers, dimensions.products, lines,
                       clean_stats(dimensions.stats, counts, return_stats(lines)))


# ---- by customer partition: the same result, one partition of the lines in memory at a time -----------------
class CleanPart(NamedTuple):
    """One customer partition's clean lines, its drop counts and its return totals (all of them add up)."""

    order_lines: pd.DataFrame
    counts: dict[str, int]
    returns: dict[str, float | int]


def clean_part(order_lines: pd.DataFrame, customers: pd.DataFrame, products: pd.DataFrame) -> CleanPart:
    """``clean_order_lines`` on one customer partition of the lines, with the clean ``customers`` and
    ``products`` (``clean_dimensions``, done once over the whole tables)."""
    lines, counts = clean_order_lines(order_lines, customers, products)
    return CleanPart(lines, counts, return_totals(lines))


def clean_parts(parts: Iterable[pd.DataFrame], customer_parts: Iterable[pd.DataFrame], products: pd.DataFrame,
                tally: list[CleanPart]) -> Iterator[pd.DataFrame]:
    """The clean lines of each customer partition in ``parts``, one at a time (a writer consuming this holds one
    part), each joined with its partition of the clean customers (``customer_parts``, the same split); each
    part's counts and return totals (without its lines) are appended to ``tally`` as it goes."""
    for part, customers in zip(parts, customer_parts, strict=True):
        out = clean_part(part, customers, products)
        tally.append(CleanPart(without_rows(out.order_lines), out.counts, out.returns))
        yield out.order_lines


def clean_on_cluster(client: Any, parts: list[Any], customer_parts: Iterable[pd.DataFrame], products: pd.DataFrame,
                     tally: list[CleanPart]) -> Iterator[pd.DataFrame]:
    """``clean_parts`` on a Dask cluster: ``parts`` are futures of the customer partitions (the validated
    dataset's parts, read on the workers); they are cleaned in parallel and come back one at a time, in part
    order, for the writer (no gather of the whole, no global sort)."""
    shared_products = client.scatter(products, broadcast=True)
    futures = client.map(clean_part, parts, client.scatter(list(customer_parts)), products=shared_products)
    for future in futures:
        out = future.result()
        future.release()
        tally.append(CleanPart(without_rows(out.order_lines), out.counts, out.returns))
        yield out.order_lines


def line_counts_of(tally: list[CleanPart]) -> tuple[dict[str, int], dict[str, float | int]]:
    """The drop counts and ``return_stats`` of all partitions together, from each partition's ``CleanPart``.

    Counts add up exactly; the two return rates are ratios of totals that add up. Sums of money are added
    partition by partition, so they may differ from the single frame's sum in the last binary digit (the
    stats are rounded to 6 and 2 decimals).
    """
    counts = {key: sum(part.counts[key] for part in tally) for key in tally[0].counts}
    totals = {key: sum(part.returns[key] for part in tally) for key in tally[0].returns}
    return counts, return_stats_of(totals)


def return_totals(lines: pd.DataFrame) -> dict[str, float | int]:
    """What ``return_stats`` is made of: counts and sums, which add up over any split of the lines."""
    is_return = lines["is_return"].to_numpy(dtype=bool)
    price = lines["unit_price"].to_numpy(dtype=np.float64)
    netted = lines["netted_quantity"].to_numpy(dtype=np.int64)
    unmatched = lines["unmatched_return"].to_numpy(dtype=bool)
    not_netted = -lines["quantity"].to_numpy(dtype=np.int64) - netted
    return {
        "purchase_lines": int((~is_return).sum()),
        "return_lines": int(is_return.sum()),
        "unmatched_return_lines": int(unmatched.sum()),
        "returned_units_netted": int(netted[is_return].sum()),
        "purchased_value": float(lines["line_amount"].to_numpy()[~is_return].sum()),
        "netted_value": float((netted * price)[is_return].sum()),
        "returned_purchase_lines": int((lines["returned_quantity"].to_numpy()[~is_return] > 0).sum()),
        "unmatched_value": float((not_netted * price)[unmatched].sum()),
    }


def return_stats_of(totals: dict[str, float | int]) -> dict[str, float | int]:
    """Return lines, how many were netted against earlier purchases, and the return rate by value and lines."""
    purchased, purchase_lines = totals["purchased_value"], totals["purchase_lines"]
    return {
        "purchase_lines": purchase_lines,
        "return_lines": totals["return_lines"],
        "unmatched_return_lines": totals["unmatched_return_lines"],
        "returned_units_netted": totals["returned_units_netted"],
        "return_rate_by_value": round(totals["netted_value"] / purchased, 6) if purchased else 0.0,
        "return_rate_by_lines": (round(totals["returned_purchase_lines"] / purchase_lines, 6)
                                 if purchase_lines else 0.0),
        "unmatched_return_value": round(totals["unmatched_value"], 2),
    }


def return_stats(lines: pd.DataFrame) -> dict[str, float | int]:
    """Return lines, how many were netted against earlier purchases, and the return rate by value and lines."""
    return return_stats_of(return_totals(lines))


def cleaning_section(stats: Stats) -> str:
    """What a person reads: what was dropped and why, and how much comes back as returns."""
    lines = stats["order_lines"]
    rows = pd.DataFrame([
        {"entity": entity, "rows in": counts["rows_in"],
         **{label: counts.get(key, 0) for key, label in (
             ("exact_duplicates_dropped", "exact duplicates"), ("conflicting_duplicates_dropped", "conflicting keys"),
             ("incomplete_dropped", "incomplete"), ("unknown_customer_dropped", "unknown customer"),
             ("unknown_product_dropped", "unknown product"))},
         "rows out": counts["rows_out"]}
        for entity, counts in stats.items()
    ])
    return (f"## Cleaning\n\n{markdown_table(rows)}\n\n"
            f"{lines['return_lines']} return lines; {lines['return_lines'] - lines['unmatched_return_lines']} netted "
            f"against the same customer's earlier purchase of the product, {lines['unmatched_return_lines']} with "
            f"no such purchase (worth {lines['unmatched_return_value']:,.2f}; kept, not netted). Return rate "
            f"**{lines['return_rate_by_value']:.2%}** of purchase value; {lines['return_rate_by_lines']:.2%} of "
            "purchase lines were returned at least in part.")


def _clean_fingerprint(run: RunSpec, validated: StageResult, mapping_name: str | None = None, **_: Any) -> str:
    return mapping_fingerprint(mapping_name) if mapping_name else ""


@stage_task("clean", fingerprint_extra=_clean_fingerprint)
def clean(run: RunSpec, validated: StageResult, mapping_name: str | None = None) -> StageResult:
    """Clean and merge the validated entities; with an ``identity`` in the mapping, on people first
    (``tasks.identity``: ``clean/customer_identity.parquet`` records every match).

    The order lines are cleaned one customer partition at a time (the validated dataset's parts, see
    ``crm_analytics.partitions``), each with the same partition of the clean customers, and written as it is
    done, so memory holds the small tables and one part; on Dask the parts are cleaned on the workers.
    Identity resolution needs every customer and line at once: with it the lines are cleaned whole, then
    written in the same partitions (of the people's ids).
    """
    store = run.store
    customers, products = (store.read_frame(validated.ref(e)) for e in ("customers", "products"))
    lines_ref = validated.ref("order_lines")
    spec = load_mapping(mapping_name).source("customers").identity if mapping_name else None
    people = None
    if spec is not None:  # identity needs every customer and line at once: it runs here, not on a cluster
        people = resolve_identity(customers, store.read_frame(lines_ref), spec)
        out = clean_and_merge(people.customers, products, people.order_lines)
        dimensions = CleanDimensions(out.customers, out.products, out.stats)
        lines = store.write_partitioned("clean", "order_lines", split_by_customer(
            out.order_lines, partition_count_for(len(out.order_lines))), sort_by=CLEAN_LINE_ORDER)
        stats, ran_on = out.stats, executor_metrics(None)
    else:
        dimensions = clean_dimensions(customers, products)
        tally: list[CleanPart] = []
        count = len(lines_ref.part_files)
        customer_parts = split_by_customer(dimensions.customers, count)
        with stage_client() as client:
            if client is None:
                parts = clean_parts(checked_partitions(store.read_parts(lines_ref), count), customer_parts,
                                    dimensions.products, tally)
            else:
                parts = clean_on_cluster(client, read_parts_on(client, lines_ref), customer_parts,
                                         dimensions.products, tally)
            lines = store.write_partitioned("clean", "order_lines", parts, sort_by=CLEAN_LINE_ORDER)
            ran_on = executor_metrics(client, partitions=len(lines.part_files))
        stats = clean_stats(dimensions.stats, *line_counts_of(tally))
    stage_logger().info("cleaned: %s", stats["order_lines"])
    artifacts = {
        "customers": store.write_frame("clean", "customers", dimensions.customers),
        "products": store.write_frame("clean", "products", dimensions.products),
        "order_lines": lines,
    }
    metrics, section = {**stats, "executor": ran_on}, cleaning_section(stats)
    if people is not None:
        artifacts["customer_identity"] = store.write_frame("clean", "customer_identity", people.crosswalk)
        metrics["identity"] = people.stats
        section += identity_section(people.stats)
    return StageResult(stage="clean", artifacts=artifacts, metrics=metrics, report_section=section)
