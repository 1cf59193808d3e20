"""Local vs Dask on this machine: the partitioned stages and a short backfill, with per-partition figures.

    python benchmarks/bench_dask.py --customers 100000 --workers 2
    python benchmarks/bench_dask.py --customers 5000 --backfill-customers 2000 --backfill-dates 2   # smoke run

1. ingest + clean + features of one as-of date, the stage edges called directly (no Prefect), with the local
   executor and on a LocalCluster of ``--workers`` single-threaded worker processes (started and warmed before
   timing), alternating for ``--rounds`` rounds; each side's fastest round counts. Validate (local in both
   paths) runs once before, and is not timed.
2. From Dask's task stream of that run: rows and compute seconds per partition task of each stage, and the
   time of the stage spent outside partition tasks (reading, scattering, gathering, the global steps,
   writing the single Parquet artifact): the serial part. From these, an estimate of a 100M-line run on N
   workers: partitioned seconds / N + serial seconds (scaled by lines), printed for a few N.
3. A backfill of ``--backfill-dates`` dates through the real flows on Prefect's embedded server: the local
   executor at concurrency 1 vs Dask with ``--workers`` workers (one date per worker).

Figures are measured in the same run and printed with their ratios; ``--out`` gets them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crm_analytics.settings import configure_prefect_defaults, get_settings  # noqa: E402

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
configure_prefect_defaults()

from bench_pipeline import cached_export, fresh_root  # noqa: E402

from crm_analytics.parameters import PipelineOptions, RunSpec  # noqa: E402

HEAVY = ("ingest", "clean", "features")
# Dask task names (key prefixes) of each stage's partition tasks: the work that spreads over workers.
# (``key_split`` drops a leading underscore.)
PARTITION_TASKS = {"ingest": ("parse_files",), "clean": ("clean_part",),
                   "features": ("purchase_value_by_category", "features_part")}
# Tasks that split the order lines by customer (read row groups, shuffle, restore file order); both clean and
# features split the lines once each.
SPLIT_TASKS = ("read_row_groups", "in_file_order", "shuffle", "split", "getitem", "concat", "assign", "group")


def use_executor(**settings: str) -> None:
    for name, value in settings.items():
        os.environ[f"CRM_{name.upper()}"] = value
    get_settings.cache_clear()


def heavy_stages(run: RunSpec, validated) -> tuple[dict[str, float], dict[str, int]]:
    """ingest, clean and features via their edges (unwrapped from Prefect and the stage cache), timed apart.

    Clean and features start from the same validated artifacts every time, so repeated rounds measure the same
    work; validate itself (local in both paths) runs once, before the rounds.
    """
    from tasks.clean import clean
    from tasks.common import measured
    from tasks.features import features
    from tasks.ingest import ingest

    seconds, rows = {}, {}
    with measured() as timing:
        ingested = ingest.fn.__wrapped__(run, "sample", None)
    seconds["ingest"] = timing["wall_seconds"]
    with measured() as timing:
        cleaned = clean.fn.__wrapped__(run, validated)
    seconds["clean"] = timing["wall_seconds"]
    with measured() as timing:
        featured = features.fn.__wrapped__(run, cleaned)
    seconds["features"] = timing["wall_seconds"]
    rows["ingest"] = ingested.artifacts["order_lines"].rows
    rows["clean"] = validated.artifacts["order_lines"].rows
    rows["features"] = cleaned.artifacts["order_lines"].rows
    rows["customers"] = featured.artifacts["customer_features"].rows
    return seconds, rows


def task_stream_figures(records: list[dict], workers: int) -> dict[str, dict[str, float]]:
    """Compute seconds per task name from Dask's task stream, and the busy span of the cluster."""
    from dask.utils import key_split

    figures: dict[str, dict[str, float]] = {}
    for record in records:
        name = key_split(record["key"])
        for interval in record["startstops"]:
            if interval["action"] == "compute":
                entry = figures.setdefault(name, {"tasks": 0, "seconds": 0.0, "max_seconds": 0.0})
                entry["tasks"] += 1
                entry["seconds"] += interval["stop"] - interval["start"]
                entry["max_seconds"] = max(entry["max_seconds"], interval["stop"] - interval["start"])
    return figures


def _import_stages() -> None:
    import tasks.clean  # noqa: F401
    import tasks.features  # noqa: F401
    import tasks.ingest  # noqa: F401


def compare(root: Path, as_of: date, workers: int, partitions: int, rounds: int) -> tuple[dict, dict]:
    """The heavy stages, local and on a LocalCluster, alternating for ``rounds`` rounds (the machine is shared:
    alternating spreads other users' load over both sides); the fastest round of each side counts."""
    from distributed import get_task_stream

    from crm_analytics.distributed import by_customer, close_shared_clients, stage_client
    from tasks.ingest import ingest
    from tasks.validate import validate

    run = RunSpec(data_root=root, as_of=as_of)
    options = PipelineOptions(data_root=str(root))
    use_executor(executor="local")
    validated = validate.fn.__wrapped__(run, ingest.fn.__wrapped__(run, "sample", None), options.validation,
                                        options.mapping)
    use_executor(executor="dask", dask_workers=str(workers), dask_partitions=str(partitions))
    started = time.perf_counter()
    with stage_client() as client:
        client.wait_for_workers(workers)
        cluster_start = time.perf_counter() - started
        # Warm the workers (imports, a first shuffle), as a long-lived cluster would be.
        warm = root / "warm-up.parquet"
        pd.DataFrame({"customer_id": [str(i) for i in range(100)], "x": range(100)}).to_parquet(warm)
        client.gather(by_customer(warm, partitions, client))
        client.run(_import_stages)
        local: dict = {"seconds": {}, "rounds": []}
        dask: dict = {"seconds": {}, "rounds": [], "cluster_start_seconds": round(cluster_start, 2)}
        for _ in range(rounds):
            use_executor(executor="local")
            seconds, local["rows"] = heavy_stages(run, validated)
            local["rounds"].append(seconds)
            use_executor(executor="dask", dask_workers=str(workers), dask_partitions=str(partitions))
            with get_task_stream(client=client) as stream:
                seconds, dask["rows"] = heavy_stages(run, validated)
            dask["rounds"].append(seconds)
            if seconds["clean"] + seconds["features"] <= min(
                    r["clean"] + r["features"] for r in dask["rounds"]):
                dask["tasks"] = task_stream_figures(stream.data, workers)
    close_shared_clients()
    use_executor(executor="local")
    for side in (local, dask):
        side["seconds"] = {stage: min(r[stage] for r in side["rounds"]) for stage in HEAVY}
    return local, dask


def estimate(local: dict, dask: dict, workers: int, partitions: int, target_lines: float = 100e6) -> dict:
    """Per stage: rows/s of one partition task, the serial seconds, and a 100M-line estimate on N workers."""
    out = {}
    for stage in HEAVY:
        tasks = [dask["tasks"][name] for name in PARTITION_TASKS[stage] if name in dask["tasks"]]
        busy = sum(t["seconds"] for t in tasks)
        count = max((t["tasks"] for t in tasks), default=0)
        split = sum(v["seconds"] for k, v in dask["tasks"].items() if k.startswith(SPLIT_TASKS)) \
            if stage != "ingest" else 0.0
        rows = dask["rows"][stage]
        # Serial: the stage's wall time minus the partition work as the workers overlapped it.
        serial = max(dask["seconds"][stage] - (busy + split / 2) / workers, 0.0)
        scale = target_lines / rows
        out[stage] = {
            "lines": rows, "partition_tasks": count,
            "lines_per_partition": round(rows / count) if count else None,
            "seconds_per_partition": round(busy / count, 3) if count else None,
            "lines_per_second_per_worker": round(rows / busy) if busy else None,
            "split_seconds": round(split, 2),
            "serial_seconds": round(serial, 2),
            "estimate_100M_seconds": {n: round(scale * ((busy + split / 2) / n + serial)) for n in (2, 8, 32, 128)},
            "local_100M_seconds": round(scale * local["seconds"][stage]),
        }
    return out


def backfill_run(export: Path, end: date, dates: int, executor: str, workers: int) -> float:
    from crm_analytics.distributed import ExecutorOptions
    from flows.backfill import backfill

    root = fresh_root(export, f"backfill-{executor}")
    options = PipelineOptions(data_root=str(root))
    started = time.perf_counter()
    summary = backfill(start=end - timedelta(days=dates - 1), end=end, concurrency=1, options=options,
                       executor=ExecutorOptions(kind=executor, workers=workers))
    wall = time.perf_counter() - started
    assert len(summary["ran"]) == dates, summary
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4, help="partitions of clean and features")
    parser.add_argument("--rounds", type=int, default=2, help="alternating local/Dask rounds; the best counts")
    parser.add_argument("--backfill-customers", type=int, default=10_000)
    parser.add_argument("--backfill-dates", type=int, default=4, help="0 skips the backfill")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench-dask"), help="where exports are cached")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # One key for every root: each would otherwise create its own, and pseudonyms would differ between them.
    os.environ.setdefault("CRM_PSEUDONYM_KEY", "bench-dask")

    export, as_of = cached_export(args.cache, args.customers)
    import great_expectations  # noqa: F401 - a slow first import that should not land on one side's timings

    load_before = os.getloadavg()
    local, dask = compare(fresh_root(export, "compare"), as_of, args.workers, args.partitions, args.rounds)
    shutil.rmtree(export.parent / f"{export.name}-compare", ignore_errors=True)
    rows = local["rows"]

    heavy_local = sum(local["seconds"][s] for s in HEAVY)
    heavy_dask = sum(dask["seconds"][s] for s in HEAVY)
    result = {
        "customers": args.customers, "order_lines": rows["ingest"], "workers": args.workers,
        "partitions": args.partitions, "cpu_count": os.cpu_count(),
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "local_seconds": local["seconds"], "dask_seconds": dask["seconds"],
        "local_rounds": local["rounds"], "dask_rounds": dask["rounds"],
        "cluster_start_seconds": dask["cluster_start_seconds"],
        "ingest_clean_features": {"local": round(heavy_local, 2), "dask": round(heavy_dask, 2),
                                  "speedup": round(heavy_local / heavy_dask, 2)},
        "per_stage_speedup": {s: round(local["seconds"][s] / dask["seconds"][s], 2) for s in HEAVY},
        "dask_tasks": {k: {**v, "seconds": round(v["seconds"], 2), "max_seconds": round(v["max_seconds"], 2)}
                       for k, v in sorted(dask["tasks"].items(), key=lambda kv: -kv[1]["seconds"])},
        "estimate": estimate(local, dask, args.workers, args.partitions),
    }
    print(json.dumps(result, indent=2, default=float))

    if args.backfill_dates:
        from prefect import flow

        flow(lambda: None, name="warm-up")()  # start the embedded server before timing
        small, end = cached_export(args.cache, args.backfill_customers)
        local_wall = backfill_run(small, end, args.backfill_dates, "local", args.workers)
        dask_wall = backfill_run(small, end, args.backfill_dates, "dask", args.workers)
        result["backfill"] = {"customers": args.backfill_customers, "dates": args.backfill_dates,
                              "local_concurrency_1_seconds": round(local_wall, 1),
                              f"dask_{args.workers}_workers_seconds": round(dask_wall, 1),
                              "speedup": round(local_wall / dask_wall, 2)}
        print(json.dumps(result["backfill"], indent=2))
    (args.out / "dask.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwritten: {args.out / 'dask.json'}")


if __name__ == "__main__":
    main()
