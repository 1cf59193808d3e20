"""Which dates a backfill runs and what its status table says, on hand-made run folders; and the alert automations
as Prefect's API takes them."""

from __future__ import annotations

from datetime import date, timedelta
from types import SimpleNamespace

import pytest

from crm_analytics.artifacts import RunStore
from crm_analytics.backfills import BackfillOptionsError, DatePlan, plan_dates, run_figures, status_row

DAYS = [date(2025, 12, 28), date(2025, 12, 29), date(2025, 12, 30), date(2025, 12, 31)]
KEYS = {d: f"key-{d}" for d in DAYS}


def _manifest(key: str, auc: float | None = 0.8125) -> dict:
    churn = {"validation_roc_auc": auc} if auc is not None else {"skipped": "too little history"}
    return {"idempotency_key": key, "flow_run_id": "11111111-2222-3333-4444-555555555555",
            "started_at": "2025-12-31T02:30:00+00:00", "finished_at": "2025-12-31T02:31:30+00:00",
            "reconciliation": {"customers": {"rows_in": 100, "quarantined": 2},
                               "order_lines": {"rows_in": 900, "quarantined": 7}},
            "stages": {"churn": churn}}


@pytest.fixture
def runs(tmp_path):
    """12-28 never ran; 12-29 failed half-way (folder, no manifest); 12-30 complete with these parameters;
    12-31 complete with other parameters."""
    RunStore(tmp_path, DAYS[1]).begin()
    RunStore(tmp_path, DAYS[2]).begin()
    RunStore(tmp_path, DAYS[2]).write_manifest(_manifest(KEYS[DAYS[2]]))
    RunStore(tmp_path, DAYS[3]).begin()
    RunStore(tmp_path, DAYS[3]).write_manifest(_manifest("key-of-other-parameters", auc=None))
    return tmp_path


def _decisions(plans: list[DatePlan]) -> list[tuple[bool, str]]:
    return [(p.runs, p.reason) for p in plans]


def test_default_reruns_missing_failed_and_changed_dates_and_skips_complete_ones(runs):
    assert _decisions(plan_dates(DAYS, runs, KEYS)) == [
        (True, "never ran"), (True, "failed or interrupted"), (False, "complete"), (True, "parameters changed")]


def test_only_missing_runs_just_the_dates_without_a_complete_run(runs):
    assert _decisions(plan_dates(DAYS, runs, KEYS, only_missing=True)) == [
        (True, "never ran"), (True, "failed or interrupted"), (False, "complete"),
        (False, "complete (other parameters)")]


def test_force_runs_everything_and_cannot_be_combined_with_only_missing(runs):
    assert all(p.runs and p.reason == "forced" for p in plan_dates(DAYS, runs, KEYS, force=True))
    with pytest.raises(BackfillOptionsError, match="contradict"):
        plan_dates(DAYS, runs, KEYS, force=True, only_missing=True)


def test_run_figures_sum_the_entities_and_report_a_skipped_churn_model():
    # 100 + 900 rows in, 2 + 7 quarantined, AUC rounded to 4 places.
    assert run_figures(_manifest("k", auc=0.812549)) == {"rows": 1000, "quarantined": 9, "churn_auc": 0.8125}
    assert run_figures(_manifest("k", auc=None))["churn_auc"] == "skipped"


def test_status_rows_take_ran_dates_from_their_flow_run_and_skipped_ones_from_the_manifest(runs):
    from datetime import datetime

    child = SimpleNamespace(id="abc", state=SimpleNamespace(name="Completed"),
                            start_time=datetime(2026, 1, 1, 3, 0, 0), end_time=datetime(2026, 1, 1, 3, 0, 42, 500000))
    link = "http://ui/runs/flow-run/{}".format
    ran = status_row(DatePlan(DAYS[2], True, "forced"), "ran", "", runs, child, link)
    assert ran == {"as_of": "2025-12-30", "outcome": "ran", "state": "Completed", "why": "forced",
                   "run": "http://ui/runs/flow-run/abc", "duration_s": 42.5, "rows": 1000, "quarantined": 9,
                   "churn_auc": 0.8125, "detail": ""}
    skipped = status_row(DatePlan(DAYS[2], False, "complete"), "skipped", "", runs, None, link)
    # The run that made the folder, and its duration from the manifest (02:30:00 -> 02:31:30).
    assert skipped["state"] == "Skipped" and skipped["duration_s"] == 90.0
    assert skipped["run"] == "http://ui/runs/flow-run/11111111-2222-3333-4444-555555555555"
    failed_child = SimpleNamespace(id="def", state=SimpleNamespace(name="Failed"), start_time=None, end_time=None)
    failed = status_row(DatePlan(DAYS[1], True, "failed or interrupted"), "failed", "order_lines: bad", runs,
                        failed_child, link)
    assert (failed["state"], failed["rows"], failed["duration_s"], failed["detail"]) == (
        "Failed", None, None, "order_lines: bad")


def test_alert_automations_are_valid_prefect_automations_watching_the_nightly_deployment():
    from prefect.events.schemas.automations import AutomationCore, Posture

    from crm_analytics.alerts import alert_automations

    deployment, block = "6f2d9c1e-0000-4000-8000-000000000001", "6f2d9c1e-0000-4000-8000-000000000002"
    failed, late = (AutomationCore.model_validate(spec)
                    for spec in alert_automations(deployment, block, timedelta(hours=4)))
    for automation in (failed, late):
        watched = automation.trigger.match_related.model_dump()
        assert watched == {"prefect.resource.id": f"prefect.deployment.{deployment}"}
        assert str(automation.actions[0].block_document_id) == block
        assert "flow_run.name" in automation.actions[0].body  # the run's name carries its date
    assert failed.trigger.posture == Posture.Reactive and "prefect.flow-run.Failed" in failed.trigger.expect
    assert "flow_run.state.message" in failed.actions[0].body
    assert late.trigger.posture == Posture.Proactive and late.trigger.within == timedelta(hours=4)
    assert late.trigger.expect == {"prefect.flow-run.Completed"}


@pytest.mark.parametrize(("args", "line"), [
    (["backfill", "--start", "2025-01-01", "--end", "2025-01-02", "--executor", "workers"],
     "error: --executor workers needs PREFECT_API_URL: the server the work pool's workers poll"),
    (["backfill", "--start", "2025-01-01", "--end", "2025-01-02", "--force", "--only-missing"],
     "error: --force and --only-missing contradict each other"),
    (["alerts", "--webhook", "http://127.0.0.1:9/hook"], "error: alerts live on a Prefect server: set PREFECT_API_URL"),
])
def test_production_options_are_checked_in_one_line_before_anything_starts(tmp_path, args, line):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "crm_analytics.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines() == [line], done.stderr
