"""The freshness gate: an export that ends too long before the as-of date, or lacks a daily file, stops the
run before any model is retrained (or is reported, with ``on_stale: warn``)."""

from __future__ import annotations

import json
import shutil
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.parameters import FreshnessOptions, PipelineOptions
from tasks.freshness import (
    StaleExportError,
    check_freshness,
    closing_weekdays,
    missing_daily_dates,
    newest_event_date,
)

D = date.fromisoformat


def _files(days: list[date]) -> list[str]:
    return [f"/landing/order_lines/{d}.csv" for d in days]


def _days(first: str, last: str, skip: tuple[str, ...] = (), weekday_closed: int | None = None) -> list[date]:
    days = [d.date() for d in pd.date_range(first, last)]
    return [d for d in days if d.isoformat() not in skip and d.weekday() != weekday_closed]


# ---- the pure checks, on hand-made dates ------------------------------------------------------------------------
def test_the_newest_event_is_the_newest_order_the_run_can_see():
    stamps = pd.Series(pd.to_datetime(["2025-03-29 23:59:00", "2025-03-31 23:59:59", "2025-04-01 00:00:00", None],
                                      utc=True))
    assert newest_event_date(stamps, D("2025-03-31")) == D("2025-03-31")  # 04-01 00:00 is after the as-of date
    assert newest_event_date(stamps, D("2025-03-30")) == D("2025-03-29")
    assert newest_event_date(stamps, D("2025-03-01")) is None             # nothing before it


def test_a_weekday_without_any_file_over_four_weeks_is_a_closing_day():
    assert closing_weekdays(_days("2025-01-01", "2025-02-28", weekday_closed=5)) == [5]  # Saturdays
    assert closing_weekdays(_days("2025-01-01", "2025-01-20", weekday_closed=5)) == []   # under four weeks: no
    assert closing_weekdays(_days("2025-01-01", "2025-02-28")) == []


def test_missing_daily_files_are_dates_between_files_after_the_last_judged_date():
    files = _days("2025-01-01", "2025-01-20", skip=("2025-01-10", "2025-01-13"))
    assert missing_daily_dates(files, after=D("2025-01-05")) == [D("2025-01-10"), D("2025-01-13")]
    assert missing_daily_dates(files, after=D("2025-01-10")) == [D("2025-01-13")]  # 01-10 was judged before
    assert missing_daily_dates(files, after=D("2024-12-01")) == [D("2025-01-10"), D("2025-01-13")]  # not before
    # the first file                                                                               # exists
    shop = _days("2025-01-01", "2025-02-28", skip=("2025-02-11",), weekday_closed=5)  # closed on Saturdays
    assert missing_daily_dates(shop, after=D("2025-01-31")) == [D("2025-02-11")]      # a Tuesday; no Saturday


def test_a_stale_export_names_the_entity_its_last_date_and_the_lag():
    options = FreshnessOptions()
    as_of = D("2025-03-31")
    judged, problems = check_freshness(as_of, {"order_lines": D("2025-03-20")},
                                       {"order_lines": _files(_days("2025-03-01", "2025-03-18"))}, options)
    assert problems == ["order_lines: the export ends 2025-03-20 (newest order), 11 days before the as-of date "
                        "2025-03-31 (freshness.max_lag_days is 2)"]
    assert judged["order_lines"] == {"newest_event": "2025-03-20", "newest_daily_file": "2025-03-18",
                                     "export_ends": "2025-03-20", "lag_days": 11, "closing_weekdays": [],
                                     "missing_daily_files": []}
    # Two days is within the limit; a header-only daily file of the as-of date makes the export current.
    assert check_freshness(as_of, {"order_lines": D("2025-03-29")}, {}, options)[1] == []
    fresh = check_freshness(as_of, {"order_lines": D("2025-03-20")},
                            {"order_lines": _files(_days("2025-03-01", "2025-03-31"))}, options)
    assert fresh[1] == [] and fresh[0]["order_lines"]["export_ends"] == "2025-03-31"
    # Nothing dated (a customer table, undated baskets): recorded as not judged, never a problem.
    assert check_freshness(as_of, {"order_lines": None}, {}, options) == ({}, [])


def test_a_missing_daily_file_is_judged_by_the_first_run_that_sees_it():
    files = _files(_days("2025-03-01", "2025-03-31", skip=("2025-03-12",)))
    options = FreshnessOptions(gap_window_days=7)
    # No earlier run: only the last week is looked at, where nothing is missing.
    assert check_freshness(D("2025-03-31"), {}, {"order_lines": files}, options)[1] == []
    # The previous complete run was of 03-11: 03-12 is new to the pipeline.
    assert check_freshness(D("2025-03-31"), {}, {"order_lines": files}, options, D("2025-03-11"))[1] == [
        "order_lines: no daily file for 2025-03-12 (files exist before and after)"]
    # A run of 03-12 or later accepted it already.
    assert check_freshness(D("2025-03-31"), {}, {"order_lines": files}, options, D("2025-03-12"))[1] == []


# ---- the real flow ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A small generated export, its last daily file dated 2025-03-31."""
    from crm_analytics.sample_data import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("freshness-export")
    generate(GeneratorConfig(customers=300, seed=11, end_date=D("2025-03-31")), root)
    return root / "landing"


def _options(root: Path, landing: Path, **freshness) -> PipelineOptions:
    return PipelineOptions(data_root=str(root), landing_dir=str(landing),
                           freshness=FreshnessOptions(**freshness))


@pytest.mark.integration
def test_a_stale_export_fails_the_run_before_any_model_is_retrained(export, tmp_path, prefect_server):
    from flows.customer_analytics import customer_analytics

    as_of = D("2025-04-11")  # eleven days after the export's last file
    with pytest.raises(StaleExportError, match=r"^stale export: order_lines: the export ends 2025-03-31 \(newest "
                       r"(order|daily file)\), 11 days before the as-of date 2025-04-11 \(freshness.max_lag_days is "
                       r"2\); no model was retrained"):
        customer_analytics(as_of=as_of, options=_options(tmp_path, export))
    run_dir = tmp_path / "runs" / f"as_of={as_of}"
    assert (run_dir / "raw").is_dir()                                    # ingest ran ...
    assert not any((run_dir / stage).exists() for stage in ("validated", "segments", "churn", "rules"))  # ... no more
    assert not (run_dir / "_manifest.json").exists()


@pytest.mark.integration
@pytest.mark.slow  # a whole run of the flow (the failing one above stops after ingest)
def test_warn_lets_a_stale_export_through_and_records_it(export, tmp_path, prefect_server):
    from flows.customer_analytics import customer_analytics

    as_of = D("2025-04-11")
    run_dir = tmp_path / "runs" / f"as_of={as_of}"
    customer_analytics(as_of=as_of, options=_options(tmp_path, export, on_stale="warn"))
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    fresh = manifest["stages"]["freshness"]
    assert fresh["entities"]["order_lines"]["lag_days"] == 11
    assert fresh["entities"]["order_lines"]["newest_daily_file"] == "2025-03-31"
    assert fresh["newest_files"]["order_lines"].endswith("2025-03-31.csv")
    assert fresh["newest_files"]["customers"].endswith("customers.csv")
    assert len(fresh["problems"]) == 1 and "11 days before" in fresh["problems"][0]
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Freshness" in report and "**Warning**: order_lines: the export ends 2025-03-31" in report


@pytest.mark.integration
def test_a_missing_daily_file_in_the_middle_fails_the_run_naming_the_date(export, tmp_path, prefect_server):
    from flows.customer_analytics import customer_analytics

    landing = tmp_path / "landing"
    shutil.copytree(export, landing)
    (landing / "order_lines" / "2025-03-27.csv").unlink()
    (landing / "order_lines" / "2025-03-29.csv").unlink()
    with pytest.raises(StaleExportError, match=r"^stale export: order_lines: no daily file for 2025-03-27, "
                                               r"2025-03-29 \(files exist before and after\); no model"):
        customer_analytics(as_of=D("2025-03-31"), options=_options(tmp_path, landing))
    assert not (tmp_path / "runs" / "as_of=2025-03-31" / "validated").exists()
    # The last file missing is not a gap but a lag: one day is within the limit, four are not.
    (landing / "order_lines" / "2025-03-31.csv").unlink()
    (landing / "order_lines" / "2025-03-30.csv").unlink()
    (landing / "order_lines" / "2025-03-28.csv").unlink()
    with pytest.raises(StaleExportError, match=r"the export ends 2025-03-26 .* 5 days before the as-of date "
                                               r"2025-03-31"):
        customer_analytics(as_of=D("2025-03-31"), options=_options(tmp_path, landing))
    assert date(2025, 3, 26) + timedelta(days=5) == date(2025, 3, 31)
