"""Backfill: run the pipeline for every date of a range, each date its own visible flow run.

Prefect has no native backfill. This flow walks ``[start, end]`` by day, week or month, skips dates already
complete with the same parameters (their manifest carries the same idempotency key) unless ``force``,
runs the rest with at most ``concurrency`` dates at a time, keeps going when a date fails, and ends with a
summary table. Each date runs as a child flow run named ``customer-analytics-<date>``; a retried backfill
redoes nothing that completed, and a date interrupted half-way resumes from its last completed stage.

Where the dates run is chosen when the backfill runs, not when this module is imported: in threads of this
process (``local``), one date per Dask worker (``dask``: an existing scheduler, or a LocalCluster started
for the backfill), or each date as a flow run of a deployment, in a process of its own on the work pool's
workers (``workers``), from the ``executor`` parameter or else the ``CRM_EXECUTOR`` settings. The task runner is
entered inside the flow so a deployment run can pick the executor with a parameter, as the CLI does.

Every backfill ends with a status table artifact, one row per date: state, a link to its flow run, duration,
rows read, rows quarantined and the churn model's AUC (``crm_analytics.backfills``).
"""

from __future__ import annotations

import itertools
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run

from crm_analytics import progress
from crm_analytics.backfills import DatePlan, plan_dates, status_row
from crm_analytics.distributed import (
    MAX_LOCAL_CONCURRENCY,
    ExecutorOptions,
    backfill_task_runner,
    cluster_threads,
    prefect_api_for_workers,
    unpartitioned,
)
from crm_analytics.errors import PermanentError
from crm_analytics.parameters import PipelineOptions, data_root_of, idempotency_key
from crm_analytics.user_errors import PREFIX, failed_with_one_line, install_run_log_filter, user_error_line

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

Step = Literal["day", "week", "month"]
MAX_CONCURRENCY = MAX_LOCAL_CONCURRENCY


class BackfillFailed(PermanentError, RuntimeError):
    """Some dates of a backfill failed; the others completed or were skipped."""


class DateRunFailed(PermanentError, RuntimeError):
    """A date's flow run on a worker ended in a state other than Completed; the message is its state's."""


class WorkersUnavailable(PermanentError):
    """A backfill on workers cannot start: no Prefect server with the deployment to run the dates as."""


def backfill_dates(start: date, end: date, step: Step = "day") -> list[date]:
    """Dates from ``start`` to ``end`` inclusive. Monthly steps keep the day of month, clipped to the month's end
    (Jan 31 -> Feb 28 -> Mar 31), so a month-end backfill stays on month ends."""
    if end < start:
        raise ValueError(f"backfill end {end} is before its start {start}")
    if step == "day":
        return [start + timedelta(days=i) for i in range((end - start).days + 1)]
    if step == "week":
        return [start + timedelta(weeks=i) for i in range((end - start).days // 7 + 1)]
    dates, months = [], 0
    while True:
        stamp = pd.Timestamp(start) + pd.DateOffset(months=months)
        if start.day > stamp.day or (pd.Timestamp(start).is_month_end and not stamp.is_month_end):
            stamp = stamp + pd.offsets.MonthEnd(0)
        if stamp.date() > end:
            return dates
        dates.append(stamp.date())
        months += 1


@task(name="run-date", cache_policy=NO_CACHE)
def run_date(as_of: date, options: PipelineOptions) -> str:
    """One date of the backfill, as a child flow run of its own."""
    # Imported here, not taken from this module's globals: on a Dask worker this function arrives pickled by
    # value, and a flow pickled along with it loses the module globals its annotations name (``date``), so
    # Prefect could not validate its parameters there. Importing it on the worker gets the real module.
    from flows.customer_analytics import customer_analytics

    with unpartitioned():
        return customer_analytics(as_of=as_of, options=options)


@task(name="run-date-on-worker", cache_policy=NO_CACHE)
def run_date_on_worker(as_of: date, options: PipelineOptions, deployment: str) -> str:
    """One date as a flow run of ``deployment``, in a process of its own on a worker; waits until it ends."""
    from prefect.deployments import run_deployment

    parameters = {"as_of": as_of.isoformat(), "options": options.model_dump(mode="json")}
    child = run_deployment(deployment, parameters=parameters, flow_run_name=f"customer-analytics-{as_of}",
                           timeout=None, poll_interval=1)
    state = child.state
    if state is None or not state.is_completed():
        name = state.name if state else "no state"
        message = (state.message if state else "") or f"the flow run ended {name}"
        raise DateRunFailed(message if message.startswith(PREFIX) else f"{name}: {message}")
    return str(child.id)


def check_deployment(deployment: str) -> None:
    """Fail at once when the deployment is not on the server, and warn when no worker of its pool is online (the
    dates would wait, Scheduled, until one starts)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise WorkersUnavailable(f"deployment {deployment!r} is not on the Prefect server at "
                                     f"{PREFECT_API_URL.value()}: run `prefect deploy --all` first") from None
        pool = found.work_pool_name
        online = [w for w in client.read_workers_for_work_pool(pool) if w.status == "ONLINE"] if pool else []
    if not online:
        get_run_logger().warning("no worker of work pool %s is online: the dates wait until one starts "
                                 "(prefect worker start --pool %s)", pool, pool)


@flow(name="customer-analytics-backfill", flow_run_name="backfill-{start}-to-{end}-by-{step}", log_prints=True)
def backfill(start: date, end: date, step: Step = "day", concurrency: int = 1, force: bool = False,
             options: PipelineOptions = PipelineOptions(),
             executor: ExecutorOptions = ExecutorOptions(), only_missing: bool = False) -> dict[str, list[str]]:
    """Run every date of ``[start, end]``.

    Args:
        start: first as-of date.
        end: last as-of date, included when a step lands on it (monthly steps keep the start's day of month).
        step: day, week or month between dates.
        concurrency: dates run at the same time with the local executor or on workers (1 to 8; each date also
            holds its own lock). On Dask, one date per worker thread of the cluster.
        force: rerun dates that are already complete with the same parameters.
        options: the pipeline options used for every date.
        executor: local threads, a Dask cluster, or the work pool's workers; empty fields come from the
            CRM_EXECUTOR settings.
        only_missing: run only the dates without a complete run (never run, failed or interrupted), whatever
            parameters the complete ones were run with.
    """
    install_run_log_filter()
    try:
        executor = executor.resolved()
        if executor.kind == "dask":
            # Child flow runs start on the Dask workers: they report to the API this flow reports to.
            with prefect_api_for_workers():
                return _backfill(start, end, step, concurrency, force, options, executor, only_missing)
        return _backfill(start, end, step, concurrency, force, options, executor, only_missing)
    except Exception as exc:
        if (failed := failed_with_one_line(exc)) is None:
            raise
        return failed  # type: ignore[return-value]  # Prefect ends the run in this state and raises exc


def date_failure(exc: BaseException) -> str:
    """What a failed date's row of the summary says: the user error's line, or a bug's first line."""
    if line := user_error_line(exc):
        return line.removeprefix(PREFIX)
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def _backfill(start: date, end: date, step: Step, concurrency: int, force: bool, options: PipelineOptions,
              executor: ExecutorOptions, only_missing: bool = False) -> dict[str, list[str]]:
    log = get_run_logger()
    concurrency = max(1, min(concurrency, MAX_CONCURRENCY))
    root = data_root_of(options)
    dates = backfill_dates(start, end, step)
    plans = plan_dates(dates, root, {d: idempotency_key(d, options) for d in dates}, force, only_missing)
    summary: dict[str, list[str]] = {"ran": [], "skipped": [p.as_of.isoformat() for p in plans if not p.runs],
                                     "failed": []}
    todo = [p.as_of for p in plans if p.runs]
    log.info("backfill %s..%s by %s: %d to run, %d already complete", start, end, step, len(todo),
             len(summary["skipped"]))
    if executor.kind == "workers" and todo:
        check_deployment(executor.deployment)

    errors: dict[str, str] = {}
    runner = backfill_task_runner(executor)

    def submit(as_of: date) -> PrefectFuture:
        if executor.kind == "workers":
            return runner.submit(run_date_on_worker, parameters={"as_of": as_of, "options": options,
                                                                 "deployment": executor.deployment})
        return runner.submit(run_date, parameters={"as_of": as_of, "options": options})

    def collect(as_of: date, future: PrefectFuture) -> None:
        try:
            future.result()
            summary["ran"].append(as_of.isoformat())
            outcome = "ran"
        except Exception as exc:  # noqa: BLE001 - one date's failure must not stop the others
            summary["failed"].append(as_of.isoformat())
            errors[as_of.isoformat()] = date_failure(exc)
            log.error("backfill date %s failed: %s", as_of, errors[as_of.isoformat()])
            outcome = "failed"
        done = len(summary["ran"]) + len(summary["failed"])
        progress.note(f"backfill: {done}/{len(todo)} dates done ({as_of} {outcome}; "
                      f"{len(summary['skipped'])} already complete)")

    with runner:
        if executor.kind == "dask":
            # Bounded by the cluster: a date waiting for its partitions hands its slot back to Dask, which would
            # otherwise start another date there.
            concurrency = cluster_threads(runner)
            log.info("backfill on Dask (%s): %d dates at a time, one per worker thread",
                     executor.address or "LocalCluster", concurrency)
        # A window of at most ``concurrency`` dates in flight: each finished date (Prefect's as_completed wakes on
        # the futures' done callbacks) lets the next one start.
        waiting = iter(todo)
        running: dict[PrefectFuture, date] = {}
        for as_of in itertools.islice(waiting, concurrency):
            running[submit(as_of)] = as_of
        while running:
            finished = next(as_completed(list(running)))
            collect(running.pop(finished), finished)
            if (as_of := next(waiting, None)) is not None:
                running[submit(as_of)] = as_of

    publish_status_table(plans, summary, errors, root, f"Backfill {start}..{end} by {step}")
    print(f"backfill summary: ran {len(summary['ran'])}, skipped {len(summary['skipped'])}, "
          f"failed {len(summary['failed'])}")
    if summary["failed"]:
        raise BackfillFailed(f"{len(summary['failed'])} of {len(todo)} dates failed: "
                             + "; ".join(f"{d}: {errors[d]}" for d in summary["failed"]))
    return summary


def child_runs() -> dict[str, FlowRun]:
    """This backfill's date runs by name (``customer-analytics-<date>``), whichever way they ran."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    this_run = flow_run.get_id()
    if not this_run:
        return {}
    runs: list[FlowRun] = []
    query = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[this_run]))
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(flow_run_filter=query, limit=200, offset=len(runs)):
            runs.extend(page)
    return {run.name: run for run in sorted(runs, key=lambda r: r.created or r.expected_start_time)}


def _link(run_id: object) -> str:
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=str(run_id)) or str(run_id)


def publish_status_table(plans: list[DatePlan], summary: dict[str, list[str]], errors: dict[str, str], root: Path,
                         title: str) -> list[dict]:
    """The per-date status table, as a Prefect table artifact (key ``customer-analytics-backfill``)."""
    outcome = {d: kind for kind, days in summary.items() for d in days}
    children = child_runs()
    rows = [status_row(plan, outcome[plan.as_of.isoformat()], errors.get(plan.as_of.isoformat(), ""), root,
                       children.get(f"customer-analytics-{plan.as_of}") if plan.runs else None, _link)
            for plan in plans]
    create_table_artifact(table=rows, key="customer-analytics-backfill",
                          description=f"{title}: {len(summary['ran'])} ran, {len(summary['skipped'])} skipped, "
                          f"{len(summary['failed'])} failed")
    return rows
