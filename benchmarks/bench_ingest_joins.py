"""Ingest of a normalized export (order headers + order lines, joined by the mapping's lookup) against ingest of
the same data pre-joined in one file, in the same process; target: within 1.5x.

    python benchmarks/bench_ingest_joins.py --lines 10000000     # or --lines 1000000 on a busy machine

Both read the order lines through the same mapping options (the discount becomes part of the price in both) and
with the same readers, line counts and parsers; the normalized read also reads the header file and looks each
line's order up in it (``tasks.ingest.lookups``). The ratio is of wall seconds of the order lines' ingest
(``parse_files``: read, look up, parse), best of ``--repeats`` runs each, interleaved; the CPU-seconds ratio of
the same runs is printed too (on a shared machine, wall seconds include the wait for a core). The breakdown times the
header read and the lookup alone. Files are written once under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from crm_analytics.mapping import SourceMapping
from tasks.common import measured
from tasks.ingest import parse_files
from tasks.ingest.lookups import attach_lookups, read_lookup_tables
from tasks.ingest.sources import read_files

AS_OF = date(2025, 12, 31)
LINES_PER_ORDER = 3


def write_exports(folder: Path, lines: int, seed: int = 5) -> None:
    """``orders.csv`` + ``order_details.csv`` and ``joined.csv`` (the same lines with their header's columns)."""
    if (folder / "joined.csv").exists() and (folder / "lines.txt").read_text() == str(lines):
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    orders = lines // LINES_PER_ORDER
    order_ids = np.arange(100_000, 100_000 + orders)
    customer = rng.integers(0, max(orders // 5, 1), orders)
    day = np.datetime64("2024-01-01") + rng.integers(0, 730, orders).astype("timedelta64[D]")
    header = pa.table({"OrderID": order_ids.astype(str), "CustomerID": np.char.add("C", customer.astype(str)),
                       "OrderDate": day.astype(str)})
    of_line = rng.integers(0, orders, lines)
    of_line.sort()
    details = {"OrderID": order_ids[of_line].astype(str), "ProductID": rng.integers(1, 2_000, lines).astype(str),
               "UnitPrice": np.char.mod("%.2f", rng.uniform(1, 100, lines)),
               "Quantity": rng.integers(1, 10, lines).astype(str),
               "Discount": rng.choice(np.array(["0", "0.05", "0.1", "0.25"]), lines)}
    options = pacsv.WriteOptions(quoting_style="none")
    pacsv.write_csv(header, folder / "orders.csv", options)
    pacsv.write_csv(pa.table(details), folder / "order_details.csv", options)
    joined = {"OrderID": details["OrderID"], "CustomerID": header["CustomerID"].to_numpy(zero_copy_only=False)[of_line],
              "OrderDate": header["OrderDate"].to_numpy(zero_copy_only=False)[of_line],
              **{k: v for k, v in details.items() if k != "OrderID"}}
    pacsv.write_csv(pa.table(joined), folder / "joined.csv", options)
    (folder / "lines.txt").write_text(str(lines))


def mappings(folder: Path) -> tuple[SourceMapping, SourceMapping]:
    columns = {"order_id": "OrderID", "product_id": "ProductID", "unit_price": "UnitPrice", "quantity": "Quantity"}
    discount = {"column": "Discount", "kind": "fraction"}
    normalized = SourceMapping.model_validate({"landing_dir": str(folder), "entities": {
        "customers": {"files": "orders.csv", "columns": {"customer_id": "CustomerID"}},
        "order_lines": {"files": "order_details.csv", "columns": columns, "discount": discount, "lookup": [
            {"what": "order header", "files": "orders.csv", "key": {"OrderID": "OrderID"},
             "columns": {"customer_id": "CustomerID", "order_ts": "OrderDate"}}]}}})
    joined = SourceMapping.model_validate({"landing_dir": str(folder), "entities": {
        "customers": {"files": "orders.csv", "columns": {"customer_id": "CustomerID"}},
        "order_lines": {"files": "joined.csv", "discount": discount,
                        "columns": {**columns, "customer_id": "CustomerID", "order_ts": "OrderDate"}}}})
    return normalized, joined


def ingest_lines(mapping: SourceMapping, folder: Path) -> tuple[dict[str, float], int, int]:
    files = [folder / mapping.entities["order_lines"].files]
    with measured() as timing:
        frame = parse_files("order_lines", mapping, folder, AS_OF, files)
    return timing, len(frame), int(frame["_parse_errors"].notna().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench-joins"))
    args = parser.parse_args()
    folder = args.cache / f"lines={args.lines}"
    started = time.perf_counter()
    write_exports(folder, args.lines)
    written = round(time.perf_counter() - started, 1)
    normalized, joined = mappings(folder)
    runs: dict[str, list[dict[str, float]]] = {"normalized": [], "pre_joined": []}
    rows = {}
    for _ in range(args.repeats):  # interleaved, so a busy spell on the shared machine hits both
        for name, mapping in (("normalized", normalized), ("pre_joined", joined)):
            timing, count, problems = ingest_lines(mapping, folder)
            runs[name].append(timing)
            rows[name] = {"rows": count, "rows_with_problems": problems}
    best = {name: min(r, key=lambda t: t["wall_seconds"]) for name, r in runs.items()}

    source = normalized.entities["order_lines"]
    with measured() as header_read:
        tables = read_lookup_tables("order_lines", source, folder, AS_OF)
    text = read_files("order_lines", source, folder, AS_OF, [folder / "order_details.csv"])
    with measured() as lookup:
        attach_lookups(text, source, tables, "order_details.csv")
    result = {
        "lines": args.lines, "orders": args.lines // LINES_PER_ORDER, "load_average": os.getloadavg()[0],
        "files_written_seconds": written,
        "file_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(folder.glob("*.csv"))},
        "rows": rows,
        "normalized": best["normalized"], "pre_joined": best["pre_joined"],
        "all_runs_wall_seconds": {name: [t["wall_seconds"] for t in r] for name, r in runs.items()},
        "ratio_normalized_to_pre_joined": round(best["normalized"]["wall_seconds"]
                                                / best["pre_joined"]["wall_seconds"], 3),
        # On a shared machine wall seconds include waiting for a core; CPU seconds are this process's own work.
        "cpu_ratio_normalized_to_pre_joined": round(best["normalized"]["cpu_seconds"]
                                                    / best["pre_joined"]["cpu_seconds"], 3),
        "breakdown": {"header_read": header_read, "lookup": lookup},
        "target_ratio": 1.5,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
