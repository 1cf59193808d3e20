"""The nightly run as it happens in production: day N+1 after day N, at one scale (default 1M customers).

    python benchmarks/bench_nightly.py --customers 1000000

Day N (the export's second-to-last day) runs first on a fresh data root, as the previous night did; then day
N+1 runs as tonight's job: its ingest reads only the new day's file plus day N's raw rows, and its churn stage
weighs tonight's challenger against day N's champion. Prints both runs per stage (wall and CPU seconds, peak
RSS) and tonight's total against the 5-minute / 6 GiB target, then the IO ceiling (pyarrow's bare read of every
landing CSV and Parquet write) and day N's full-read ingest against it; writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import STAGES, cached_export, fresh_root, io_ceiling, run_flow  # noqa: E402

TARGET_SECONDS, TARGET_RSS_MB = 300, 6 * 1024


def stage_rows(label: str, wall: float, manifest: dict) -> list[dict]:
    rows = []
    for stage in STAGES:
        timing = manifest["stages"].get(stage, {}).get("timing", {})
        rows.append({"run": label, "stage": stage, **timing})
    rows.append({"run": label, "stage": "flow (wall)", "wall_seconds": round(wall, 2),
                 "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in rows)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from prefect import flow

    flow(lambda: None, name="warm-up")()
    import great_expectations  # noqa: F401

    import flows.customer_analytics  # noqa: F401

    export, last_day = cached_export(args.cache, args.customers)
    root = fresh_root(export, "nightly")
    day_n = last_day - timedelta(days=1)
    load_before = os.getloadavg()[0]
    wall_n, manifest_n = run_flow(root, day_n)
    wall_tonight, manifest_tonight = run_flow(root, last_day)
    rows = stage_rows(f"day N ({day_n})", wall_n, manifest_n) + stage_rows(
        f"tonight ({last_day})", wall_tonight, manifest_tonight)
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    ceiling = io_ceiling(export, args.cache / "ceiling.parquet")
    ingest_n = manifest_n["stages"]["ingest"]["timing"]["wall_seconds"]
    ingest_tonight = manifest_tonight["stages"]["ingest"]["timing"]["wall_seconds"]
    peak = max(r.get("peak_rss_mb", 0) for r in rows if r["run"].startswith("tonight"))
    ingest = manifest_tonight["inputs"]["entities"]["order_lines"]
    summary = {
        "customers": args.customers, "order_lines": ingest["rows"], "tonight_ingest_read": ingest["read"],
        "tonight_wall_seconds": round(wall_tonight, 1), "tonight_peak_rss_mb": peak,
        "day_n_wall_seconds": round(wall_n, 1),
        # Ingest against pyarrow's bare read of every landing CSV + Parquet write, measured after the runs.
        "io_ceiling_seconds": round(ceiling, 2), "day_n_ingest_vs_io_ceiling": round(ingest_n / ceiling, 2),
        "tonight_ingest_vs_day_n": round(ingest_tonight / ingest_n, 2),
        "wall_vs_target": round(wall_tonight / TARGET_SECONDS, 2), "rss_vs_target": round(peak / TARGET_RSS_MB, 2),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "churn": {k: manifest_tonight["stages"]["churn"].get(k)
                  for k in ("chosen_model", "promoted", "validation_roc_auc")},
    }
    print(json.dumps(summary, indent=2))
    frame.to_csv(args.out / "nightly_stages.csv", index=False)
    (args.out / "nightly.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
