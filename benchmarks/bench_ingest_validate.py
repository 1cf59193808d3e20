"""Ingest + validate throughput (rows/s) on a large generated export, stage edges called without Prefect.

    python benchmarks/bench_ingest_validate.py --customers 1000000     # ~9.4M order lines
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import cached_export, fresh_root  # noqa: E402

from crm_analytics.parameters import PipelineOptions, RunSpec  # noqa: E402
from tasks.common import measured  # noqa: E402
from tasks.ingest import ingest  # noqa: E402
from tasks.validate import validate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench"))
    args = parser.parse_args()
    export, as_of = cached_export(args.cache, args.customers)
    root = fresh_root(export, "ingest-validate")
    run, options = RunSpec(data_root=root, as_of=as_of), PipelineOptions(data_root=str(root))
    with measured() as ingest_timing:
        ingested = ingest.fn.__wrapped__(run, options.mapping, None)
    with measured() as validate_timing:
        validated = validate.fn.__wrapped__(run, ingested, options.validation, options.mapping)
    rows = sum(m["rows"] for m in ingested.metrics["entities"].values())
    result = {
        "customers": args.customers,
        "rows_in": rows,
        "order_lines": ingested.metrics["entities"]["order_lines"]["rows"],
        "ingest": {**ingest_timing, "rows_per_second": round(rows / ingest_timing["wall_seconds"])},
        "validate": {**validate_timing, "rows_per_second": round(rows / validate_timing["wall_seconds"])},
        "ingest_plus_validate_rows_per_second": round(
            rows / (ingest_timing["wall_seconds"] + validate_timing["wall_seconds"])),
        "reconciliation": {e: {k: m[k] for k in ("rows_in", "valid", "quarantined")}
                           for e, m in validated.metrics["entities"].items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
