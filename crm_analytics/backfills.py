"""Which dates of a backfill run, and the per-date status table it ends with (pure functions, no Prefect).

A date is skipped when its run folder is complete with the same parameters (the manifest's idempotency key);
``only_missing`` also skips dates complete with other parameters, so a range can be topped up with just the dates
that never ran, failed or were interrupted. Every row of the status table comes from what is on disk (the
manifest) and what the orchestrator recorded (the date's flow run), never from the backfill's own memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from crm_analytics.artifacts import RunStore
from crm_analytics.errors import PermanentError

__all__ = ["DatePlan", "plan_dates", "run_figures", "status_row"]


class BackfillOptionsError(PermanentError, ValueError):
    """Backfill options that contradict each other."""


@dataclass(frozen=True)
class DatePlan:
    """One date of a backfill: whether it runs, and why."""

    as_of: date
    runs: bool
    reason: str


def plan_dates(dates: list[date], data_root: Path, wanted_key: dict[date, str], force: bool = False,
               only_missing: bool = False) -> list[DatePlan]:
    """Decide each date from its run folder.

    Args:
        dates: the backfill's dates.
        data_root: where the run folders are.
        wanted_key: each date's idempotency key under the backfill's parameters.
        force: run every date.
        only_missing: run only dates without a complete run, whatever parameters complete ones used.
    """
    if force and only_missing:
        raise BackfillOptionsError("force and only_missing contradict each other: force reruns every date, "
                                   "only_missing only the dates without a complete run")
    plans = []
    for as_of in dates:
        store = RunStore(data_root, as_of)
        if force:
            plans.append(DatePlan(as_of, True, "forced"))
        elif not store.is_complete():
            missing = "failed or interrupted" if store.run_dir.exists() else "never ran"
            plans.append(DatePlan(as_of, True, missing))
        elif store.completed_key() == wanted_key[as_of]:
            plans.append(DatePlan(as_of, False, "complete"))
        elif only_missing:
            plans.append(DatePlan(as_of, False, "complete (other parameters)"))
        else:
            plans.append(DatePlan(as_of, True, "parameters changed"))
    return plans


def run_figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """Rows read, rows quarantined (over all entities) and the churn model's held-out ROC AUC of a complete run."""
    counts = manifest.get("reconciliation", {}).values()
    churn = manifest.get("stages", {}).get("churn", {})
    auc = churn.get("validation_roc_auc")
    return {"rows": sum(c["rows_in"] for c in counts), "quarantined": sum(c["quarantined"] for c in counts),
            "churn_auc": round(auc, 4) if isinstance(auc, float) else ("skipped" if "skipped" in churn else None)}


def _seconds(started: str | datetime | None, finished: str | datetime | None) -> float | None:
    if not (started and finished):
        return None
    start = datetime.fromisoformat(started) if isinstance(started, str) else started
    end = datetime.fromisoformat(finished) if isinstance(finished, str) else finished
    return round((end - start).total_seconds(), 1)


def status_row(plan: DatePlan, outcome: str, detail: str, data_root: Path, child: Any | None,
               link_of: Any) -> dict[str, Any]:
    """One row of the status table.

    Args:
        plan: the date and why it ran or was skipped.
        outcome: ran, skipped or failed.
        detail: a failed date's one-line reason.
        data_root: where its run folder is.
        child: the date's flow run in this backfill (anything with ``id``, ``state``, ``start_time``,
            ``end_time``), or ``None`` for a skipped date.
        link_of: flow run id -> link to it in the UI (or the id when there is no UI).
    """
    store = RunStore(data_root, plan.as_of)
    manifest = store.read_manifest() if store.is_complete() else {}
    if child is not None:
        state = child.state.name if child.state else outcome
        run_id = child.id
        duration = _seconds(child.start_time, child.end_time)
    else:  # skipped: the run that made the folder
        state, run_id = "Skipped", manifest.get("flow_run_id")
        duration = _seconds(manifest.get("started_at"), manifest.get("finished_at"))
    figures = run_figures(manifest) if manifest else {"rows": None, "quarantined": None, "churn_auc": None}
    return {"as_of": plan.as_of.isoformat(), "outcome": outcome, "state": state, "why": plan.reason,
            "run": link_of(run_id) if run_id else "", "duration_s": duration, **figures, "detail": detail}
