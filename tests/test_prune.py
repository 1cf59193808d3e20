"""Retention: ``RunStore.prune`` / ``crm-analytics prune`` deletes old run folders whole, keeps what the next run
or a running one needs, and survives a crash half-way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from crm_analytics.artifacts import TRASH_PREFIX, RunStore

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
D = date.fromisoformat


def _run(root: Path, as_of: str, made_days_ago: float, complete: bool = True) -> RunStore:
    """A run folder with a 1,000-byte artifact, made ``made_days_ago`` days before NOW."""
    store = RunStore(root, D(as_of))
    store.write_json("churn", "metrics", {"pad": "x" * 1000})
    if complete:
        made = (NOW - timedelta(days=made_days_ago)).isoformat()
        store.write_manifest({"as_of": as_of, "finished_at": made})
    else:
        stamp = (NOW - timedelta(days=made_days_ago)).timestamp()
        os.utime(store.run_dir, (stamp, stamp))
    return store


@pytest.fixture
def runs(tmp_path) -> Path:
    """Nightly runs of 01-01..01-10 made the day after each date, one failed run (01-05 incomplete) and a
    failed run of 01-11, newer than every complete one."""
    for day in range(1, 11):
        as_of = date(2026, 1, day)
        _run(tmp_path, as_of.isoformat(), (NOW.date() - as_of).days - 1, complete=day != 5)
    _run(tmp_path, "2026-01-11", 40, complete=False)
    return tmp_path


def _decisions(root: Path, **kwargs) -> dict[str, tuple[bool, str]]:
    decisions, _ = RunStore.prune(root, now=NOW, **kwargs)
    return {d.as_of.isoformat(): (d.delete, d.reason) for d in decisions}


def test_dry_run_lists_every_folder_with_its_reason_and_deletes_nothing(runs):
    before = sorted(p.name for p in RunStore.runs_dir(runs).iterdir())
    plan = _decisions(runs, keep_last=3, keep_days=50, dry_run=True)
    # Complete: 01-01..01-04 and 01-06..01-10; the 3 latest are 01-08..01-10. Made 49 (01-10) to 58 days ago.
    assert {d for d, (delete, _) in plan.items() if delete} == {
        "2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05", "2026-01-06", "2026-01-07"}
    assert plan["2026-01-10"] == (False, "the latest complete run: the next run reads its segments, churn "
                                         "champion and raw rows")
    assert plan["2026-01-09"] == (False, "one of the 3 latest complete runs")
    assert plan["2026-01-08"] == (False, "one of the 3 latest complete runs")
    assert plan["2026-01-07"][1] == "complete, older than 50 days and not among the 3 latest complete runs"
    assert plan["2026-01-11"] == (False, "incomplete and newer than the latest complete run: a rerun resumes it")
    assert plan["2026-01-05"][1].startswith("incomplete (failed or interrupted), older than 50 days")
    # By age instead: 01-08 and 01-09 were made 51 and 50 days ago, 01-07 exactly 52 (not within 52).
    by_age = _decisions(runs, keep_last=1, keep_days=52, dry_run=True)
    assert [d for d, (_, why) in by_age.items() if why == "made in the last 52 days"] == ["2026-01-08", "2026-01-09"]
    assert by_age["2026-01-07"][0] is True
    assert sorted(p.name for p in RunStore.runs_dir(runs).iterdir()) == before


def test_prune_deletes_exactly_the_plan_and_reports_the_bytes(runs):
    plan = _decisions(runs, keep_last=3, keep_days=50, dry_run=True)
    decisions, _ = RunStore.prune(runs, keep_last=3, keep_days=50, now=NOW)
    assert {d.as_of.isoformat(): (d.delete, d.reason) for d in decisions} == plan
    left = [store.as_of.isoformat() for store in RunStore.run_folders(runs)]
    assert left == ["2026-01-08", "2026-01-09", "2026-01-10", "2026-01-11"]
    assert all(d.bytes >= 1000 for d in decisions)  # the padded artifact, plus the manifest when complete
    assert not list(RunStore.runs_dir(runs).glob(f"{TRASH_PREFIX}*"))
    # Pruning again with the same limits finds nothing more to delete.
    assert not any(delete for delete, _ in _decisions(runs, keep_last=3, keep_days=50).values())


def test_the_latest_complete_run_is_kept_whatever_the_limits(runs):
    plan = _decisions(runs, keep_last=1, keep_days=0, dry_run=True)
    assert [d for d, (delete, _) in plan.items() if not delete] == ["2026-01-10", "2026-01-11"]


def test_a_running_date_and_the_run_it_reads_are_kept(runs):
    """A run of 01-04 in progress (holding its lock, as ``RunStore.lock`` does) reads 01-03 as its previous run."""
    holding, release = threading.Event(), threading.Event()

    def running() -> None:
        with RunStore(runs, D("2026-01-04")).lock():
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=running)
    worker.start()
    try:
        assert holding.wait(10)
        plan = _decisions(runs, keep_last=1, keep_days=0)
        assert plan["2026-01-04"] == (False, "a run of this date is in progress (its lock is held)")
        assert plan["2026-01-03"] == (False, "a run in progress reads it as its previous complete run")
        assert plan["2026-01-02"][0] is True
    finally:
        release.set()
        worker.join()
    assert [s.as_of.isoformat() for s in RunStore.run_folders(runs)] == [
        "2026-01-03", "2026-01-04", "2026-01-10", "2026-01-11"]


def test_a_prune_killed_half_way_leaves_each_folder_whole_or_gone_and_the_next_prune_finishes(runs, monkeypatch):
    real_rmtree = shutil.rmtree
    calls = []

    def dies_half_way(path, *args, **kwargs):
        """Deletes part of the first folder, then the process 'dies'."""
        calls.append(Path(path))
        victim = next(p for p in Path(path).rglob("*") if p.is_file())
        victim.unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        RunStore.prune(runs, keep_last=3, keep_days=50, now=NOW)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # The folder being deleted had already left its place under its hidden trash name, whole or not; every other
    # folder is untouched, and every listed complete run still has its manifest.
    assert calls[0].name.startswith(f"{TRASH_PREFIX}as_of=2026-01-01.")
    trash = list(RunStore.runs_dir(runs).glob(f"{TRASH_PREFIX}*"))
    assert trash == [calls[0]]
    assert D("2026-01-01") not in [s.as_of for s in RunStore.run_folders(runs)]
    assert RunStore.complete_dates(runs)[0] == D("2026-01-02")
    for store in RunStore.run_folders(runs):
        assert store.is_complete() == (store.as_of not in (D("2026-01-05"), D("2026-01-11")))
    # The next prune removes the leftover and carries on.
    decisions, removed = RunStore.prune(runs, keep_last=3, keep_days=50, now=NOW)
    assert removed == trash and not trash[0].exists()
    assert [s.as_of.isoformat() for s in RunStore.run_folders(runs)] == [
        "2026-01-08", "2026-01-09", "2026-01-10", "2026-01-11"]


def test_a_crash_before_the_rename_leaves_the_folder_complete(runs, monkeypatch):
    def rename_fails(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "rename", rename_fails)
    with pytest.raises(OSError):
        RunStore.prune(runs, keep_last=3, keep_days=50, now=NOW)
    assert RunStore(runs, D("2026-01-01")).is_complete()
    assert not list(RunStore.runs_dir(runs).glob(f"{TRASH_PREFIX}*"))


def test_the_command_lists_and_deletes(runs):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "crm_analytics.cli", "prune", "--data-root", str(runs), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    # Real time now: every hand-made run is older than 0 days, so only the 2 latest complete runs and the failed
    # newer run stay.
    dry = cli("--keep-last", "2", "--keep-days", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert sum(line.lstrip().startswith("would delete  as_of=") for line in lines) == 8
    assert lines[-1].startswith("would delete 8 of 11 run folders")
    assert len(RunStore.run_folders(runs)) == 11
    done = cli("--keep-last", "2", "--keep-days", "0")
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("deleted 8 of 11 run folders")
    assert [s.as_of.isoformat() for s in RunStore.run_folders(runs)] == ["2026-01-09", "2026-01-10", "2026-01-11"]
    bad = cli("--keep-last", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


@pytest.mark.integration
def test_the_maintenance_flow_prunes_on_the_prefect_server(runs, prefect_server):
    from flows.maintenance import maintenance

    listed = maintenance(keep_last=2, keep_days=30, dry_run=True, data_root=str(runs))
    assert listed == {"deleted": 8, "kept": 3, "bytes_deleted": listed["bytes_deleted"],
                      "bytes_kept": listed["bytes_kept"], "trash_removed": 0}
    assert len(RunStore.run_folders(runs)) == 11 and listed["bytes_deleted"] >= 8 * 1000
    done = maintenance(keep_last=2, keep_days=30, data_root=str(runs))
    assert done == listed
    assert [s.as_of.isoformat() for s in RunStore.run_folders(runs)] == ["2026-01-09", "2026-01-10", "2026-01-11"]
