"""Operating the pipeline: backfill dates, the per-date lock, resumable stages, backfills and SIGKILL resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.artifacts import RunLockedError, RunStore, StageResult
from crm_analytics.parameters import PipelineOptions, RunSpec
from flows.backfill import backfill_dates
from tasks.common import stage_task
from tests.conftest import read_all


# ---- backfill dates ----------------------------------------------------------------------------------------
def test_monthly_steps_stay_on_month_ends_and_days_of_month():
    assert backfill_dates(date(2025, 1, 31), date(2025, 4, 30), "month") == [
        date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30)]
    assert backfill_dates(date(2025, 1, 15), date(2025, 3, 14), "month") == [date(2025, 1, 15), date(2025, 2, 15)]


def test_daily_and_weekly_steps_include_both_ends_when_they_fall_on_the_step():
    assert len(backfill_dates(date(2025, 1, 1), date(2025, 1, 30))) == 30
    assert backfill_dates(date(2025, 1, 1), date(2025, 1, 15), "week") == [
        date(2025, 1, 1), date(2025, 1, 8), date(2025, 1, 15)]
    with pytest.raises(ValueError, match="before its start"):
        backfill_dates(date(2025, 2, 1), date(2025, 1, 1))


# ---- the per-date lock -------------------------------------------------------------------------------------
def _hold_lock(root: str, day: str, seconds: float, ready) -> None:
    with RunStore(Path(root), date.fromisoformat(day)).lock():
        ready.set()
        time.sleep(seconds)


def test_a_date_is_locked_across_processes_but_other_dates_are_free(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), "2025-01-31", 3.0, ready))
    holder.start()
    try:
        assert ready.wait(30)
        locked = RunStore(tmp_path, date(2025, 1, 31)).lock(timeout_seconds=0.5, poll_seconds=0.1)
        with pytest.raises(RunLockedError, match="another run of 2025-01-31"), locked:
            pass
        started = time.monotonic()
        with RunStore(tmp_path, date(2025, 2, 1)).lock(timeout_seconds=0.5):
            assert time.monotonic() - started < 0.5
    finally:
        holder.join(30)
    with RunStore(tmp_path, date(2025, 1, 31)).lock(timeout_seconds=5):  # released when the holder ends
        pass


def test_a_lock_held_by_a_killed_process_is_released(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), "2025-01-31", 60.0, ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with RunStore(tmp_path, date(2025, 1, 31)).lock(timeout_seconds=5):
        pass


# ---- resumable stages --------------------------------------------------------------------------------------
CALLS = {"n": 0}


@stage_task("clean")
def _toy_stage(run: RunSpec, upstream: StageResult, factor: int) -> StageResult:
    CALLS["n"] += 1
    ref = run.store.write_frame("clean", "toy", pd.DataFrame({"x": [factor]}))
    return StageResult(stage="clean", artifacts={"toy": ref})


def test_a_stage_is_reused_only_while_inputs_parameters_and_outputs_are_unchanged(tmp_path):
    run = RunSpec(data_root=tmp_path, as_of=date(2025, 1, 31))
    upstream_ref = run.store.write_frame("raw", "input", pd.DataFrame({"v": [1, 2]}))
    upstream = StageResult(stage="ingest", artifacts={"input": upstream_ref})
    CALLS["n"] = 0
    first = _toy_stage.fn(run, upstream, 2)
    again = _toy_stage.fn(run, upstream, 2)
    assert again.artifacts == first.artifacts and again.metrics["reused"] and CALLS["n"] == 1  # reused
    _toy_stage.fn(run, upstream, 3)
    assert CALLS["n"] == 2                                                       # a parameter changed
    changed = run.store.write_frame("raw", "input", pd.DataFrame({"v": [1, 3]}))
    _toy_stage.fn(run, StageResult(stage="ingest", artifacts={"input": changed}), 3)
    assert CALLS["n"] == 3                                                       # an input changed
    Path(run.store.path("clean", "toy.parquet")).write_bytes(b"tampered")
    _toy_stage.fn(run, StageResult(stage="ingest", artifacts={"input": changed}), 3)
    assert CALLS["n"] == 4                                                       # an output was damaged


# ---- flows on a real temporary Prefect server --------------------------------------------------------------
def _copy_landing(source_root: Path, target_root: Path) -> Path:
    shutil.copytree(source_root / "landing", target_root / "landing")
    return target_root


def _stage_records(root: Path, day: str) -> dict[str, str]:
    folder = root / "runs" / f"as_of={day}" / "_stages"
    return {p.stem: json.loads(p.read_text())["finished_at"] for p in folder.glob("*.json")}


def _parquet_hashes(root: Path, day: str) -> dict[str, str]:
    manifest = json.loads((root / "runs" / f"as_of={day}" / "_manifest.json").read_text())
    return {k: v["content_hash"] for k, v in manifest["artifacts"].items() if v["kind"] == "parquet"}


@pytest.mark.integration
def test_backfill_runs_each_date_skips_complete_ones_and_survives_a_failed_date(sample_root, prefect_server,
                                                                                tmp_path):
    from flows.backfill import BackfillFailed, backfill

    root = _copy_landing(sample_root, tmp_path)
    # The last day's landing file arrives broken: only the run of that date reads it, and it fails.
    (root / "landing" / "order_lines" / "2025-12-31.csv").write_text("order_id,customer\nO1,C1\n")
    options = PipelineOptions(data_root=str(root))
    window = {"start": date(2025, 12, 29), "end": date(2025, 12, 31), "step": "day", "options": options}
    failed_date = r"1 of 3 dates failed: 2025-12-31: order_lines: .*2025-12-31.csv lacks required column"
    with pytest.raises(BackfillFailed, match=failed_date):
        backfill(concurrency=2, **window)
    for day in ("2025-12-29", "2025-12-30"):
        assert (root / "runs" / f"as_of={day}" / "_manifest.json").exists()
    assert not (root / "runs" / "as_of=2025-12-31" / "_manifest.json").exists()

    before = _stage_records(root, "2025-12-30")
    with pytest.raises(BackfillFailed, match="1 of 1 dates failed"):
        backfill(concurrency=2, **window)  # a retried backfill redoes nothing that completed
    assert _stage_records(root, "2025-12-30") == before

    forced = backfill(start=date(2025, 12, 30), end=date(2025, 12, 30), force=True, options=options)
    assert forced == {"ran": ["2025-12-30"], "skipped": [], "failed": []}
    # Forced, yet the stages whose inputs did not change were reused. Segment and churn also depend on the
    # previous complete run (identities, champion), which 2025-12-29 may have become since: they may rerun.
    stateless = ("ingest", "validate", "clean", "features", "rules")
    after = _stage_records(root, "2025-12-30")
    assert {s: after[s] for s in stateless} == {s: before[s] for s in stateless}


@pytest.mark.integration
def test_a_run_killed_mid_way_resumes_and_ends_equal_to_an_uninterrupted_run(sample_root, prefect_server,
                                                                              tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.customer_analytics import customer_analytics

    day = "2025-12-31"
    monkeypatch.setenv("CRM_PSEUDONYM_KEY", "one key for both data roots")  # else each root makes its own
    killed_root = _copy_landing(sample_root, tmp_path / "killed")
    clean_root = _copy_landing(sample_root, tmp_path / "uninterrupted")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "CRM_DATA_ROOT": str(killed_root)}
    log = (tmp_path / "killed-run.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "crm_analytics.cli", "run", "--as-of", day], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "features" not in _stage_records(killed_root, day):
            assert process.poll() is None, "the run ended early:\n" + (tmp_path / "killed-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the features stage"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # mid-way through a later stage (segment or churn)
        process.wait(60)
    assert not (killed_root / "runs" / f"as_of={day}" / "_manifest.json").exists()
    done_before_kill = _stage_records(killed_root, day)
    assert {"ingest", "validate", "clean", "features"} <= set(done_before_kill)

    customer_analytics(as_of=date.fromisoformat(day), options=PipelineOptions(data_root=str(killed_root)))
    after = _stage_records(killed_root, day)
    assert {s: after[s] for s in done_before_kill} == done_before_kill  # completed stages were not recomputed
    assert set(after) > set(done_before_kill)

    customer_analytics(as_of=date.fromisoformat(day), options=PipelineOptions(data_root=str(clean_root)))
    assert _parquet_hashes(killed_root, day) == _parquet_hashes(clean_root, day)


@pytest.mark.integration
def test_two_runs_of_one_date_take_turns_while_another_date_runs_alongside(sample_root, prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    from flows.customer_analytics import customer_analytics

    root = _copy_landing(sample_root, tmp_path)
    options = PipelineOptions(data_root=str(root))
    errors: list[BaseException] = []

    def run(day: date) -> None:
        try:
            customer_analytics(as_of=day, options=options)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in (date(2025, 12, 31), date(2025, 12, 31),
                                                                  date(2025, 12, 30))]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(900)
    assert not errors
    with get_client(sync_client=True) as client:
        runs = {r.id: r for r in read_all(client.read_flow_runs, flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_="customer-analytics-2025-12-3")))}
        logs = read_all(client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(runs))))
        waited = {runs[log.flow_run_id].name for log in logs if "holds the run folder; waiting" in log.message}
    same_day = sorted((r for r in runs.values() if r.name.endswith("2025-12-31")), key=lambda r: r.start_time)
    other_day = [r for r in runs.values() if r.name.endswith("2025-12-30")]
    assert len(same_day) >= 2 and len(other_day) >= 1
    assert "customer-analytics-2025-12-31" in waited and "customer-analytics-2025-12-30" not in waited
    first, second = same_day[-2], same_day[-1]
    assert other_day[-1].start_time < first.end_time  # the other date ran alongside, not after
    assert second.end_time > first.end_time
    manifest = json.loads((root / "runs" / "as_of=2025-12-31" / "_manifest.json").read_text())
    assert manifest["reconciliation"]["order_lines"]["rows_in"] > 0
