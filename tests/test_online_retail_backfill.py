"""Backfilling the real Online Retail landing folder month by month through the backfill flow (issue #6).

Four as-of dates one month apart, the last on the export's last day (2011-12-09), run by the real backfill flow
on the temporary Prefect server with concurrency 1, so each month after the first can reuse the previous
month's ingested rows. What is checked against the landing folder itself: each run read exactly the lines of
the daily files dated up to its as-of date, nothing later; the incremental reads of the later months add up to
the export's published facts; and a second backfill over the same range redoes nothing.
"""

from __future__ import annotations

import csv
import json
import time
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from crm_analytics.artifacts import dataset_hash, file_sha256
from crm_analytics.parameters import PipelineOptions, as_of_end
from tests.conftest import ONLINE_RETAIL, assert_published_facts

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BY_DAY = ONLINE_RETAIL / "by_day"
START, END = date(2011, 9, 9), date(2011, 12, 9)  # the day of month is kept; the last date is the export's last day
DATES = [date(2011, 9, 9), date(2011, 10, 9), date(2011, 11, 9), date(2011, 12, 9)]
STAGES = ("ingest", "freshness", "validate", "clean", "features", "segment", "churn", "rules", "value",
          "forecast", "report")


def _lines_in(path: Path) -> int:
    """Data lines of one daily CSV (quoted fields may hold commas or line breaks)."""
    with path.open(newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


def _files_up_to(as_of: date) -> list[Path]:
    return sorted(p for p in BY_DAY.glob("*.csv") if date.fromisoformat(p.name[:10]) <= as_of)


def _stage_records(root: Path, as_of: date) -> dict[str, str]:
    records = root / "runs" / f"as_of={as_of}" / "_stages"
    return {p.stem: p.read_text() for p in sorted(records.glob("*.json"))}


@pytest.fixture(scope="module")
def monthly_backfill(tmp_path_factory, prefect_server):
    if not BY_DAY.is_dir():
        pytest.skip(f"the Online Retail export is not at {BY_DAY} (it lives in ../shared, outside the repo)")
    from flows.backfill import backfill, backfill_dates

    assert backfill_dates(START, END, "month") == DATES
    root = tmp_path_factory.mktemp("online-retail-backfill")
    options = PipelineOptions(mapping="online_retail", landing_dir=str(BY_DAY), data_root=str(root))
    began, started = datetime.now(UTC), time.perf_counter()
    first = backfill(start=START, end=END, step="month", concurrency=1, options=options)
    seconds = time.perf_counter() - started
    manifests = {d: json.loads((root / "runs" / f"as_of={d}" / "_manifest.json").read_text()) for d in DATES}
    records = {d: _stage_records(root, d) for d in DATES}
    again = backfill(start=START, end=END, step="month", concurrency=1, options=options)
    print(f"\nmonthly Online Retail backfill of {len(DATES)} dates: {seconds:.1f}s wall")
    for d in DATES:
        ingest = manifests[d]["stages"]["ingest"]
        print(f"  {d}: ingest {ingest['entities']['order_lines']['read']}, "
              f"{ingest['timing']['wall_seconds']:.1f}s, {ingest['entities']['order_lines']['rows']} lines")
    return {"root": root, "options": options, "first": first, "again": again, "manifests": manifests,
            "records": records, "seconds": seconds, "began": began}


def test_every_month_ran_and_a_second_backfill_skips_them_all(monthly_backfill):
    dates = [d.isoformat() for d in DATES]
    assert monthly_backfill["first"] == {"ran": dates, "skipped": [], "failed": []}
    assert monthly_backfill["again"] == {"ran": [], "skipped": dates, "failed": []}
    root = monthly_backfill["root"]
    for d in DATES:  # the repeated backfill did not touch a single stage or manifest
        assert _stage_records(root, d) == monthly_backfill["records"][d], d
        manifest = json.loads((root / "runs" / f"as_of={d}" / "_manifest.json").read_text())
        assert manifest == monthly_backfill["manifests"][d], d


def test_each_date_is_its_own_completed_flow_run_on_the_server(monthly_backfill):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterStartTime

    names = [f"customer-analytics-{d}" for d in DATES]
    # Only runs started by this backfill: other tests of the session run some of the same dates on this server.
    since = FlowRunFilterStartTime(after_=monthly_backfill["began"])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names),
                                                                   start_time=since))
    assert sorted(r.name for r in runs) == names  # one run per date, none repeated by the second backfill
    assert all(r.state is not None and r.state.is_completed() for r in runs)
    by_id = {str(r.id): r.name for r in runs}
    for d in DATES:
        assert by_id[monthly_backfill["manifests"][d]["flow_run_id"]] == f"customer-analytics-{d}"


def test_each_run_folder_is_complete_with_its_manifest(monthly_backfill):
    from flows.customer_analytics import idempotency_key

    root, options = monthly_backfill["root"], monthly_backfill["options"]
    for d in DATES:
        run_dir = root / "runs" / f"as_of={d}"
        manifest = monthly_backfill["manifests"][d]
        assert manifest["as_of"] == d.isoformat()
        assert manifest["idempotency_key"] == idempotency_key(d, options)
        assert manifest["parameters"]["mapping"] == "online_retail"
        assert set(manifest["stages"]) == set(STAGES), d
        assert len(manifest["artifacts"]) >= 25, d
        for key, meta in manifest["artifacts"].items():
            path = run_dir / meta["path"]
            # A table split by customer (the validated and clean order lines): its hash covers every part.
            content = dataset_hash(path.parent, meta["parts"]) if "parts" in meta else file_sha256(path)
            assert content == meta["content_hash"], (d, key)
        assert sum("parts" in meta for meta in manifest["artifacts"].values()) == 2, d
        assert (run_dir / "report" / "report.md").is_file(), d
        assert not list(run_dir.rglob("*.tmp")), d


def test_each_run_read_exactly_the_lines_dated_up_to_its_as_of_date(monthly_backfill):
    root, manifests = monthly_backfill["root"], monthly_backfill["manifests"]
    london = ZoneInfo("Europe/London")
    previous_rows = 0
    for d in DATES:
        files = _files_up_to(d)
        lines = manifests[d]["inputs"]["entities"]["order_lines"]
        assert lines["rows"] == sum(_lines_in(p) for p in files), d
        assert lines["files"] == len(files), d
        assert lines["last_file"] == f"{d}.csv" == files[-1].name, d
        assert lines["rows"] > previous_rows, d
        previous_rows = lines["rows"]
        day_start = pd.Timestamp(datetime(d.year, d.month, d.day, tzinfo=london)).tz_convert("UTC")
        for stage in ("raw", "validated"):
            stamps = pd.read_parquet(root / "runs" / f"as_of={d}" / stage / "order_lines.parquet",
                                     columns=["order_ts"])["order_ts"]
            # Nothing after the as-of date; and the as-of day's own file was read (the export has lines that day).
            assert day_start <= stamps.max() < as_of_end(d), (d, stage, stamps.max())
        raw = pd.read_parquet(root / "runs" / f"as_of={d}" / "raw" / "order_lines.parquet", columns=["_source_file"])
        assert set(raw["_source_file"]) == {p.name for p in files}, d


def test_later_months_ingest_only_their_new_days(monthly_backfill):
    root, manifests = monthly_backfill["root"], monthly_backfill["manifests"]
    modes = [manifests[d]["inputs"]["entities"]["order_lines"]["read"] for d in DATES]
    assert modes == ["full", "incremental", "incremental", "incremental"]
    for earlier, later in zip(DATES, DATES[1:], strict=False):
        sources = json.loads((root / "runs" / f"as_of={later}" / "raw" / "sources.json").read_text())
        assert sources["entities"]["order_lines"]["mode"] == "incremental"
        assert sources["entities"]["order_lines"]["new_files"] == len(_files_up_to(later)) - len(_files_up_to(earlier))
    for d in DATES:
        timing = manifests[d]["stages"]["ingest"]["timing"]
        assert timing["wall_seconds"] > 0, d


def test_the_incremental_reads_add_up_to_the_published_facts(monthly_backfill):
    # The last month was built from three months of reused history plus its new days: it must equal a full read,
    # whose figures the dataset publishes (and test_online_retail checks on a single full run).
    last = monthly_backfill["manifests"][END]
    assert last["inputs"]["entities"]["order_lines"]["read"] == "incremental"
    assert_published_facts(last["inputs"])
    reasons = last["stages"]["validate"]["entities"]["order_lines"]["reasons"]
    assert reasons["customer_id is missing"] == 541_909 - 406_829


def test_the_last_incremental_read_equals_a_fresh_full_read(monthly_backfill, tmp_path):
    # Cheaper than a fresh pipeline run: a fresh full ingest of the last date, written the way ingest writes it.
    from crm_analytics.artifacts import RunStore
    from crm_analytics.mapping import load_mapping
    from tasks.ingest import ingest_all

    frames, sources = ingest_all(load_mapping("online_retail"), tmp_path, END, str(BY_DAY))
    assert sources["order_lines"]["mode"] == "full"
    artifacts = monthly_backfill["manifests"][END]["artifacts"]
    for entity in ("order_lines", "customers", "products"):
        fresh = RunStore(tmp_path, END).write_frame("raw", entity, frames[entity])
        assert artifacts[f"raw/{entity}"]["rows"] == fresh.rows, entity
        assert artifacts[f"raw/{entity}"]["content_hash"] == fresh.content_hash, entity


def test_every_line_of_every_month_is_valid_or_quarantined(monthly_backfill):
    previous_valid = 0
    for d in DATES:
        reconciliation = monthly_backfill["manifests"][d]["reconciliation"]
        assert set(reconciliation) == {"order_lines", "customers", "products"}, d
        for entity, counts in reconciliation.items():
            assert counts["rows_in"] == counts["valid"] + counts["quarantined"], (d, entity)
            assert counts["valid"] > 0, (d, entity)
        assert reconciliation["order_lines"]["rows_in"] == (
            monthly_backfill["manifests"][d]["inputs"]["entities"]["order_lines"]["rows"])
        assert reconciliation["order_lines"]["valid"] > previous_valid, d
        previous_valid = reconciliation["order_lines"]["valid"]
