"""Maintenance: prune old run folders on a schedule (the ``maintenance`` deployment).

Wiring only: the rules (what is always kept, the crash-safe delete) live in ``RunStore.prune``. Prefect's own
database is pruned by the server's vacuum service (see the README's *Retention*).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from crm_analytics.artifacts import RunStore
from crm_analytics.settings import get_settings


@flow(name="crm-maintenance", log_prints=True)
def maintenance(keep_last: int = 7, keep_days: int = 30, dry_run: bool = False,
                data_root: str | None = None) -> dict[str, int]:
    """Delete run folders older than ``keep_days`` days beyond the ``keep_last`` latest complete runs.

    Args:
        keep_last: complete runs always kept, newest first (at least 1).
        keep_days: runs made in this many days are kept.
        dry_run: only list what would be deleted.
        data_root: root of runs/; empty means the CRM_DATA_ROOT setting.
    """
    root = data_root or get_settings().data_root
    decisions, trash = RunStore.prune(root, keep_last=max(1, keep_last), keep_days=keep_days, dry_run=dry_run)
    log = get_run_logger()
    for decision in decisions:
        if decision.delete:
            log.info("%s run folder as_of=%s (%d bytes): %s", "would delete" if dry_run else "deleted",
                     decision.as_of, decision.bytes, decision.reason)
    create_table_artifact(key="crm-maintenance", table=[
        {"as_of": d.as_of.isoformat(), "action": ("would delete" if dry_run else "deleted") if d.delete else "kept",
         "MiB": round(d.bytes / 2**20, 1), "reason": d.reason} for d in decisions],
        description=f"Run folders under {root}: keep_last={keep_last}, keep_days={keep_days}, dry_run={dry_run}")
    summary = {"deleted": sum(d.delete for d in decisions), "kept": sum(not d.delete for d in decisions),
               "bytes_deleted": sum(d.bytes for d in decisions if d.delete),
               "bytes_kept": sum(d.bytes for d in decisions if not d.delete), "trash_removed": len(trash)}
    print(f"maintenance: {summary}")
    return summary
