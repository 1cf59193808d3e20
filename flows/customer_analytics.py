"""The nightly/manual flow: ingest -> freshness -> validate -> clean -> (features -> segment | rules) -> churn ->
(value | forecast) -> report, where ``a | b`` run at the same time.

Only wiring here: each step is a task from ``tasks/`` that reads and writes artifacts and passes references.
The run folder is complete when ``_manifest.json`` exists; it is written last. A run holds its date's lock
for its whole duration, and each stage reuses its recorded outputs when inputs, parameters and code are
unchanged, so a rerun after a crash resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from crm_analytics.artifacts import RunStore, StageResult, code_version, utc_now
from crm_analytics.mapping import load_mapping
from crm_analytics.parameters import PipelineOptions, RunSpec, data_root_of, idempotency_key
from crm_analytics.user_errors import failed_with_one_line, install_run_log_filter
from tasks.churn import churn
from tasks.clean import clean
from tasks.features import features
from tasks.forecast import forecast
from tasks.freshness import freshness
from tasks.ingest import ingest
from tasks.report import report
from tasks.rules import rules
from tasks.segment import segment
from tasks.validate import validate
from tasks.value import value


@contextmanager
def alongside(stage: Any, *args: Any) -> Iterator[PrefectFuture[Any]]:
    """Run ``stage(*args)`` in a worker thread while the block runs; its future is resolved when the block ends.

    If the block fails, the stage is waited for before the error goes on, so no stage is still writing when the
    run releases its date's lock; a failure of the stage itself is raised by ``result()`` after the block.
    """
    future = stage.submit(*args)
    try:
        yield future
    finally:
        future.wait()


def default_as_of(scheduled: datetime | None = None) -> date:
    """The day before the run's scheduled start (UTC), so a late or retried nightly run keeps its date."""
    scheduled = scheduled or flow_run.get_scheduled_start_time() or datetime.now(UTC)
    return (scheduled.astimezone(UTC) - timedelta(days=1)).date()


def _run_name() -> str:
    as_of = flow_run.get_parameters().get("as_of") or default_as_of()
    return f"customer-analytics-{as_of}"


def reconciliation(ingested: dict[str, Any], validated: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per entity: rows in = valid + quarantined, and the source's data lines (counted from the files' bytes, not
    by the parser) = the lines those rows cover, so a row merged from several lines cannot reconcile silently."""
    out = {}
    for entity, m in validated["entities"].items():
        out[entity] = {k: m[k] for k in ("rows_in", "valid", "quarantined", "lines_in", "lines_quarantined")}
        data_lines = ingested["entities"].get(entity, {}).get("data_lines")
        if data_lines is not None and data_lines != m["lines_in"]:
            raise AssertionError(f"{entity}: {data_lines} data lines in the source, but its rows cover "
                                 f"{m['lines_in']}")
        out[entity]["data_lines"] = m["lines_in"] if data_lines is None else data_lines
    return out


def build_manifest(store: RunStore, options: PipelineOptions, started_at: str,
                   results: list[StageResult]) -> dict[str, Any]:
    by_stage = {r.stage: r for r in results}
    return {
        "as_of": store.as_of.isoformat(),
        "idempotency_key": idempotency_key(store.as_of, options),
        "flow_run_id": str(flow_run.get_id()) if flow_run.get_id() else None,
        "started_at": started_at,
        "finished_at": utc_now(),
        "code_version": code_version(),
        "parameters": options.model_dump(mode="json"),
        "inputs": by_stage["ingest"].metrics,
        "reconciliation": reconciliation(by_stage["ingest"].metrics, by_stage["validate"].metrics),
        "stages": {r.stage: r.metrics for r in results},
        "artifacts": {
            f"{ref.stage}/{name}": ref.manifest_entry(store.relative(ref))
            for r in results for name, ref in r.artifacts.items()
        },
    }


@flow(name="customer-analytics", flow_run_name=_run_name, log_prints=True)
def customer_analytics(as_of: date | None = None, options: PipelineOptions = PipelineOptions()) -> str:
    """Run every stage for one as-of date and return the run folder.

    Args:
        as_of: the business date to process; empty means the day before the scheduled start.
        options: mapping, data root, seed and per-stage settings.
    """
    install_run_log_filter()
    try:
        return run_stages(as_of or default_as_of(), options)
    except Exception as exc:
        if (failed := failed_with_one_line(exc)) is None:
            raise
        return failed  # type: ignore[return-value]  # Prefect ends the run in this state and raises exc


def run_stages(as_of: date, options: PipelineOptions) -> str:
    """The stages of one as-of date in order, under the date's lock; the manifest is written last."""
    load_mapping(options.mapping)  # a wrong mapping stops here, before a complete run of the date is withdrawn
    run = RunSpec(data_root=data_root_of(options), as_of=as_of)
    store = run.store
    with store.lock(on_wait=get_run_logger().warning):
        store.begin()
        started_at = utc_now()
        ingested = ingest(run, options.mapping, options.landing_dir, options.validation.earliest_date)
        fresh = freshness(run, ingested, options.freshness, options.mapping)
        validated = validate(run, ingested, options.validation, options.mapping)
        cleaned = clean(run, validated, options.mapping)
        # Two cores: the rules run beside features and segment, the forecast beside value (each pair mostly one
        # core each); churn runs alone, it uses both (its model families fit on two threads).
        with alongside(rules, run, cleaned, options.rules) as mining:
            featured = features(run, cleaned)
            segmented = segment(run, featured, options.segments, options.seed)
        mined = mining.result()
        churned = churn(run, cleaned, options.churn, options.seed, validated)
        with alongside(forecast, run, cleaned, segmented, options.forecast) as forecasting:
            valued = value(run, cleaned, segmented, churned, mined, options.value, options.churn.risk_band_edges)
        forecasted = forecasting.result()
        results = [ingested, fresh, validated, cleaned, featured, segmented, churned, mined, valued, forecasted]
        results.append(report(run, results))
        manifest = store.write_manifest(build_manifest(store, options, started_at, results))
    print(f"run complete: {store.run_dir} (manifest {manifest.name})")
    return str(store.run_dir)
