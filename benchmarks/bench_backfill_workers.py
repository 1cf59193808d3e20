"""A backfill on the production stack: each date its own flow run on a process worker, 1 slot vs 2 slots.

    python benchmarks/bench_backfill_workers.py --customers 2000 --dates 6

Starts the stack of ``crm-analytics production`` on loopback (PostgreSQL, a Prefect server on it, the work pool,
``prefect deploy --all``, one process worker), then runs the same backfill (``--dates`` dates ending on the
export's last day, each date a flow run of the ``manual`` deployment) into a fresh data root with the pool's
date queue limited to 1 slot (backfill concurrency 1), then to 2 slots (concurrency 2); ``--rounds`` repeats the
pair, alternating the order, and each side's fastest round counts. Printed: the wall time of each backfill, the
per-date durations from its flow runs, the 1-minute load average before and after (other work on the machine
shows there), the speed-up of 2 slots over 1, and the lock errors (SQLite ``database is locked``, PostgreSQL
deadlocks or lock time-outs) in the server's and the worker's logs and in the date runs' states. ``--out`` gets
the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crm_analytics.settings import configure_prefect_defaults  # noqa: E402

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
configure_prefect_defaults()

from bench_pipeline import cached_export, fresh_root  # noqa: E402

from crm_analytics.parameters import PipelineOptions  # noqa: E402
from crm_analytics.production import production_stack, set_date_slots  # noqa: E402

LOCK_ERRORS = re.compile(r"database is locked|deadlock detected|lock timeout|could not obtain lock", re.IGNORECASE)


def backfill_on_workers(stack, export: Path, end, dates: int, slots: int, label: str) -> dict:
    """One backfill with ``slots`` date slots; its wall time, per-date durations and the load around it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from crm_analytics.distributed import ExecutorOptions
    from flows.backfill import backfill

    set_date_slots(stack.env, slots)
    root = fresh_root(export, f"workers-{label}")
    options = PipelineOptions(data_root=str(root))
    load_before = os.getloadavg()[0]
    with temporary_settings(updates={PREFECT_API_URL: stack.api_url, PREFECT_UI_URL: stack.ui_url}):
        started = time.perf_counter()
        state = backfill(start=end - timedelta(days=dates - 1), end=end, concurrency=slots, options=options,
                         executor=ExecutorOptions(kind="workers"), return_state=True)
        wall = time.perf_counter() - started
        summary = state.result()
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(summary["ran"]) == dates, summary
    return {"slots": slots, "wall_seconds": round(wall, 1), "load_1min_before": round(load_before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
            "date_seconds": sorted(round(c.total_run_time.total_seconds(), 1) for c in children),
            "date_states": sorted({c.state.name for c in children}),
            "date_processes": len({c.infrastructure_pid for c in children})}


def lock_errors(stack) -> dict[str, int]:
    logs = [stack.home / "prefect" / "logs" / "server.log", *sorted((stack.home / "logs").glob("worker-*.log"))]
    return {log.name: len(LOCK_ERRORS.findall(log.read_text(errors="replace"))) for log in logs if log.exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--dates", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="pairs of (1 slot, 2 slots); the fastest counts")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    export, end = cached_export(args.cache, args.customers)
    print(f"export: {args.customers:,} customers, {args.dates} dates ending {end}; {os.cpu_count()} CPUs")
    home = args.cache / "production-stack"
    results: dict[int, list[dict]] = {1: [], 2: []}
    with production_stack(home, export, slots=1) as stack:
        print(f"stack up: Prefect server {stack.api_url} on PostgreSQL, pool with one process worker")
        for round_ in range(args.rounds):
            for slots in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                result = backfill_on_workers(stack, export, end, args.dates, slots, f"{slots}-slots-{round_}")
                results[slots].append(result)
                print(f"round {round_ + 1}, {slots} slot(s): {result['wall_seconds']} s "
                      f"(load {result['load_1min_before']} -> {result['load_1min_after']}); dates "
                      f"{result['date_seconds']} s; states {result['date_states']}, "
                      f"{result['date_processes']} processes")
        errors = lock_errors(stack)
    one, two = (min(results[s], key=lambda r: r["wall_seconds"]) for s in (1, 2))
    speedup = one["wall_seconds"] / two["wall_seconds"]
    print(f"\n1 slot {one['wall_seconds']} s, 2 slots {two['wall_seconds']} s: speed-up {speedup:.2f}x "
          f"(target 1.6x); lock errors in the logs: {errors}")
    if args.out:
        args.out.write_text(json.dumps({"customers": args.customers, "dates": args.dates, "cpus": os.cpu_count(),
                                        "rounds": results, "speedup": round(speedup, 3), "lock_errors": errors},
                                       indent=2))


if __name__ == "__main__":
    main()
