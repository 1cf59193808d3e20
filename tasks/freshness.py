"""Freshness: is the export recent enough for the as-of date? Checked right after ingest, before any model.

An entity's export *ends* at the later of its newest order (``order_ts`` before the end of the as-of date) and
its newest daily file's date; it is **stale** when that end lies more than ``freshness.max_lag_days`` before
the as-of date. For daily-file entities a date without a file between two files is a **missing daily file**,
judged once, by the first run that can see it: dates after the previous complete run's as-of date (or, with
no earlier run, within ``freshness.gap_window_days`` of the as-of date). A weekday on which none of the files
read falls (a shop closed on Saturdays, over at least four weeks of files) is a closing day, not a gap.
Entities with neither order timestamps nor daily files (a customer table, a labels table, undated baskets)
are recorded but not judged. ``on_stale: fail`` stops the run with one line naming every problem;
``warn`` logs and reports them and the run goes on.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from crm_analytics.artifacts import RunStore, StageResult
from crm_analytics.mapping import load_mapping
from crm_analytics.parameters import FreshnessOptions, RunSpec, as_of_end
from tasks.common import DataQualityError, stage_logger, stage_task

__all__ = ["StaleExportError", "check_freshness", "closing_weekdays", "freshness", "missing_daily_dates",
           "newest_event_date"]

MIN_WEEKS_FOR_CLOSING_DAYS = 4
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class StaleExportError(DataQualityError):
    """The export ends too long before the as-of date, or a daily file is missing: no model is retrained."""


def newest_event_date(order_ts: pd.Series, as_of: date) -> date | None:
    """The (UTC) day of the newest timestamp the run can see (before the end of the as-of date), if any."""
    stamps = pd.to_datetime(order_ts, utc=True)
    seen = stamps[stamps < as_of_end(as_of)]
    return None if seen.dropna().empty else seen.max().date()


def daily_file_date(path: str) -> date:
    return date.fromisoformat(Path(path).name[:10])


def closing_weekdays(file_dates: list[date]) -> list[int]:
    """Weekdays (0 = Monday) on which no file falls, if the files span at least four weeks (else none)."""
    if not file_dates or (max(file_dates) - min(file_dates)).days < 7 * MIN_WEEKS_FOR_CLOSING_DAYS:
        return []
    return sorted(set(range(7)) - {d.weekday() for d in file_dates})


def missing_daily_dates(file_dates: list[date], after: date) -> list[date]:
    """Dates after ``after`` and between the first and the newest file that have no file, closing days aside."""
    if not file_dates:
        return []
    present, closed = set(file_dates), set(closing_weekdays(file_dates))
    day = max(after + timedelta(days=1), min(file_dates))
    missing = []
    while day < max(file_dates):
        if day not in present and day.weekday() not in closed:
            missing.append(day)
        day += timedelta(days=1)
    return missing


def check_freshness(as_of: date, newest_events: dict[str, date | None], daily_files: dict[str, list[str]],
                    options: FreshnessOptions, previous_as_of: date | None = None
                    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per judged entity: its newest order, newest daily file, where the export ends, the lag and the missing
    daily files; and the problems (one phrase each, naming the entity and the dates)."""
    gaps_after = previous_as_of or as_of - timedelta(days=options.gap_window_days)
    entities: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for entity in sorted(set(newest_events) | set(daily_files)):
        event = newest_events.get(entity)
        dates = [daily_file_date(p) for p in daily_files.get(entity, [])]
        newest_file = max(dates) if dates else None
        ends = max((d for d in (event, newest_file) if d is not None), default=None)
        if ends is None:
            continue
        lag = (as_of - ends).days
        missing = missing_daily_dates(dates, gaps_after)
        entities[entity] = {
            "newest_event": event.isoformat() if event else None,
            "newest_daily_file": newest_file.isoformat() if newest_file else None,
            "export_ends": ends.isoformat(), "lag_days": lag,
            "closing_weekdays": [WEEKDAYS[d] for d in closing_weekdays(dates)],
            "missing_daily_files": [d.isoformat() for d in missing],
        }
        if lag > options.max_lag_days:
            by = "newest order" if ends == event else "newest daily file"
            problems.append(f"{entity}: the export ends {ends} ({by}), "
                            f"{lag} days before the as-of date {as_of} (freshness.max_lag_days is "
                            f"{options.max_lag_days})")
        if missing:
            shown = ", ".join(d.isoformat() for d in missing[:10]) + (f" and {len(missing) - 10} more"
                                                                       if len(missing) > 10 else "")
            problems.append(f"{entity}: no daily file for {shown} (files exist before and after)")
    return entities, problems


def _previous_as_of(run: RunSpec, **_: Any) -> str:
    previous = run.store.previous_complete()
    return f"previous complete run {previous.as_of if previous else None}"


def _newest_file(files: dict[str, list[int]]) -> str | None:
    """The most recently modified landing file (``files``: path -> [size, mtime_ns], as ingest records them)."""
    return max(files, key=lambda path: files[path][1]) if files else None


@stage_task("freshness", fingerprint_extra=_previous_as_of)
def freshness(run: RunSpec, ingested: StageResult, options: FreshnessOptions, mapping_name: str) -> StageResult:
    """Judge the export's freshness from what ingest read; fail (or warn) before any model is retrained."""
    mapping = load_mapping(mapping_name)
    sources = RunStore.read_json(ingested.ref("sources"))["entities"]
    newest_events: dict[str, date | None] = {}
    lines = mapping.entities.get("order_lines")
    dated = lines is not None and "order_ts" not in lines.defaults  # a constant order_ts dates nothing
    if dated and sources.get("order_lines", {}).get("mode") != "absent":
        frame = RunStore.read_frame(ingested.ref("order_lines"), columns=["order_ts"])
        newest_events["order_lines"] = newest_event_date(frame["order_ts"], run.as_of)
    daily = {entity: list(state["files"]) for entity, state in sources.items()
             if entity in mapping.entities and mapping.entities[entity].daily}
    previous = run.store.previous_complete()
    judged, problems = check_freshness(run.as_of, newest_events, daily, options,
                                       previous.as_of if previous else None)
    newest_files = {entity: _newest_file(state["files"]) for entity, state in sources.items() if state["files"]}
    if problems and options.on_stale == "fail":
        raise StaleExportError("stale export: " + "; ".join(problems) + "; no model was retrained (set "
                               "freshness.on_stale=warn to run on it anyway, e.g. for a backfill of history)")
    log = stage_logger()
    for problem in problems:
        log.warning("freshness: %s", problem)
    section = ["## Freshness", "", "| entity | newest order | newest daily file | export ends | lag (days) |",
               "|---|---|---|---|---|"]
    section += [f"| {e} | {m['newest_event'] or '-'} | {m['newest_daily_file'] or '-'} | {m['export_ends']} | "
                f"{m['lag_days']} |" for e, m in judged.items()]
    if not judged:
        section.append("| (no order timestamps or daily files: freshness not judged) | | | | |")
    section += [""] + [f"- **Warning**: {problem}" for problem in problems]
    return StageResult(stage="freshness", artifacts={}, report_section="\n".join(section) + "\n", metrics={
        "max_lag_days": options.max_lag_days, "on_stale": options.on_stale, "entities": judged,
        "newest_files": newest_files, "problems": problems,
        "gaps_checked_after": (previous.as_of if previous else run.as_of - timedelta(days=options.gap_window_days))
        .isoformat(),
    })
