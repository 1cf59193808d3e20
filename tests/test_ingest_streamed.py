"""The streamed ingest of a daily-file entity (``stream_entity``) equals the whole-frame definition it replaced:
``read_source`` (last night's rows plus the new days', or every file) written with ``write_frame``, counted by
``ingest_metrics`` and checked by ``check_declared_personal_data`` — on hand-made daily files with parse errors,
duplicates, an empty day and a new column, at several row-group and batch sizes."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pyarrow.parquet as pq
import pytest

from crm_analytics.artifacts import RunStore
from crm_analytics.errors import PersonalDataError
from crm_analytics.mapping import load_mapping
from crm_analytics.privacy import check_declared_personal_data
from tasks.common import SourceSchemaError
from tasks.ingest import History, ingest_metrics
from tasks.ingest.stage import known_prefix, read_source, stream_entity

HEADER = '"order_id","customer_id","order_ts","product_id","quantity","unit_price"\n'
DAYS = {
    # two copies of one line, a line repeated on a later day
    "2025-01-01": ['"O1","C1","2025-01-01 09:00:00","P1","1","2.50"', '"O1","C1","2025-01-01 09:00:00","P1","1","2.50"',
                   '"O2","C2","2025-01-01 10:00:00","P2","2","-0.0"', '"O3","C3","2025-01-01 11:00:00","P1","3","1"'],
    # values that do not parse, a wrong field count, a negative quantity, a missing customer, a blank line
    "2025-01-02": ['"O4","C1","2025-01-02 09:00:00","P1","x","2.50"', '"O5","C2","not a time","P2","1","2"',
                   '"O6","C3","2025-01-02 09:30:00","P3","1"', '', '"O7","","2025-01-02 10:00:00","P1","-1","0.0"'],
    "2025-01-03": [],  # an empty day: the header only
    # tonight: a copy of a line of day 1, of its own line, a quoted line break, no final line break
    "2025-01-04": ['"O3","C3","2025-01-01 11:00:00","P1","3","1"', '"O8","C4","2025-01-04 08:00:00","P2","1","0"',
                   '"O8","C4","2025-01-04 08:00:00","P2","1","0"', '"O9","C5","2025-01-04 09:00:00","P\n4","1","3"',
                   '"O10","C1","2025-01-04 10:00:00","P1","2","2.5"'],
}


def _landing(tmp_path, days=DAYS, header=HEADER, final_newline_on=("2025-01-01", "2025-01-02", "2025-01-03")):
    folder = tmp_path / "landing" / "order_lines"
    folder.mkdir(parents=True)
    for day, lines in days.items():
        end = "\n" if day in final_newline_on else ""
        (folder / f"{day}.csv").write_text(header + "\n".join(lines) + (end if lines else ""))
    return tmp_path / "landing"


@pytest.fixture(params=[(1 << 20, 1 << 25), (1, 1), (2, 40), (3, 200), (7, 1)], ids=lambda p: f"rg{p[0]}-b{p[1]}")
def sizes(request, monkeypatch):
    """Row groups of 1, 2, 3, 7 rows (and the default), files parsed one by one or a few at a time."""
    import crm_analytics.artifacts as artifacts
    import tasks.ingest.stage as stage
    import tasks.ingest.streamed as streamed

    rows, batch = request.param
    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", rows)
    monkeypatch.setattr(streamed, "ROW_GROUP_ROWS", rows)
    monkeypatch.setattr(stage, "ROW_GROUP_ROWS", rows)
    monkeypatch.setattr(stage, "BATCH_BYTES", batch)
    return request.param


def _old(mapping, landing, as_of, previous=None):
    """The whole-frame definition: frame, metrics and record as the edge computed them before streaming."""
    frame, record = read_source("order_lines", mapping, landing, as_of, previous)
    check_declared_personal_data({"order_lines": frame}, mapping)
    metrics = ingest_metrics(frame, "order_lines", mapping.source("order_lines"),
                             known_prefix(previous, record["mode"]))
    return frame, metrics, record


def _new(tmp_path, mapping, landing, as_of, previous=None):
    store = RunStore(tmp_path / "new", as_of)
    ref, metrics, record = stream_entity(store, "order_lines", mapping, landing, as_of, previous)
    return store.read_frame(ref), metrics, record, ref


def _same(old, new):
    frame, metrics, record = old
    streamed, streamed_metrics, streamed_record, ref = new
    pd.testing.assert_frame_equal(streamed, frame)
    assert pq.read_schema(ref.file).equals(pq.read_schema(_written(frame)), check_metadata=True)
    assert streamed_metrics == metrics and streamed_record == record
    assert ref.rows == len(frame)


def _written(frame):
    """The file ``write_frame`` writes of the whole frame (its schema is the one the streamed file must have)."""
    import tempfile
    from pathlib import Path

    return RunStore(Path(tempfile.mkdtemp(prefix="whole-")), date(2025, 1, 1)).write_frame("raw", "order_lines",
                                                                                          frame).file


def test_a_full_read_streamed_equals_the_whole_frame(tmp_path, sizes):
    mapping = load_mapping("sample")
    landing = _landing(tmp_path)
    old = _old(mapping, landing, date(2025, 1, 4))
    assert old[1]["exact_duplicate_rows"] == 3 and old[1]["unparseable_rows"] >= 4 and old[1]["files"] == 3
    assert old[1]["data_lines"] == 14 and old[1]["bad_field_count_rows"] == 1
    _same(old, _new(tmp_path, mapping, landing, date(2025, 1, 4)))


@pytest.mark.parametrize("last_night", ["in memory", "on file", "on file, no count"])
def test_an_incremental_night_streamed_equals_the_whole_frame(tmp_path, sizes, last_night):
    mapping = load_mapping("sample")
    landing = _landing(tmp_path)
    yesterday, counts, record = _old(mapping, landing, date(2025, 1, 3))
    counted = None if last_night.endswith("no count") else counts["exact_duplicate_rows"]
    raw = RunStore(tmp_path / "yesterday", date(2025, 1, 3)).write_frame("raw", "order_lines", yesterday)
    previous = (History(yesterday, record["files"], None, counted) if last_night == "in memory" else
                History(None, record["files"], None, counted, raw))
    old = _old(mapping, landing, date(2025, 1, 4), History(yesterday, record["files"], None, counted))
    assert old[2]["mode"] == "incremental" and old[2]["new_files"] == 1
    new = _new(tmp_path, mapping, landing, date(2025, 1, 4), previous)
    _same(old, new)
    assert new[1] == _old(mapping, landing, date(2025, 1, 4))[1]  # and equals a full read's metrics


def test_a_night_with_no_new_file_or_an_empty_one_is_streamed_alike(tmp_path, sizes):
    mapping = load_mapping("sample")
    landing = _landing(tmp_path)
    yesterday, counts, record = _old(mapping, landing, date(2025, 1, 2))
    raw = RunStore(tmp_path / "yesterday", date(2025, 1, 2)).write_frame("raw", "order_lines", yesterday)
    for as_of in (date(2025, 1, 2), date(2025, 1, 3)):  # the same files again; then an empty day
        old = _old(mapping, landing, as_of, History(yesterday, record["files"], None, counts["exact_duplicate_rows"]))
        assert old[2]["mode"] == "incremental" and len(old[0]) == len(yesterday)  # last night's rows, none added
        new = _new(tmp_path / str(as_of), mapping, landing, as_of,
                   History(None, record["files"], None, counts["exact_duplicate_rows"], raw))
        _same(old, new)
        assert new[3].rows == len(yesterday)


def test_a_new_column_is_read_incrementally_and_stops_a_full_read_in_both(tmp_path, sizes):
    mapping = load_mapping("sample")
    landing = _landing(tmp_path)
    (landing / "order_lines" / "2025-01-05.csv").write_text(
        HEADER.rstrip("\n") + ',"coupon"\n"O11","C2","2025-01-05 08:00:00","P1","1","2","SPRING"\n')
    yesterday, counts, record = _old(mapping, landing, date(2025, 1, 4))
    raw = RunStore(tmp_path / "yesterday", date(2025, 1, 4)).write_frame("raw", "order_lines", yesterday)
    counted = counts["exact_duplicate_rows"]
    old = _old(mapping, landing, date(2025, 1, 5), History(yesterday, record["files"], None, counted))
    _same(old, _new(tmp_path, mapping, landing, date(2025, 1, 5), History(None, record["files"], None, counted, raw)))
    with pytest.raises(SourceSchemaError) as whole:
        _old(mapping, landing, date(2025, 1, 5))
    with pytest.raises(SourceSchemaError) as streamed:
        _new(tmp_path / "full", mapping, landing, date(2025, 1, 5))
    assert str(streamed.value) == str(whole.value)
    assert not (tmp_path / "full" / "runs").exists() or not list((tmp_path / "full").rglob("order_lines.parquet"))


def test_undeclared_personal_data_stops_both_before_the_file_is_in_place(tmp_path, sizes):
    mapping = load_mapping("sample")
    days = {f"2025-01-0{d}": [f'"O{d}{i}","c{d}{i}@example.com","2025-01-0{d} 09:00:00","P1","1","2"' for i in range(3)]
            for d in range(1, 5)}
    landing = _landing(tmp_path, days)
    with pytest.raises(PersonalDataError) as whole:
        _old(mapping, landing, date(2025, 1, 4))
    with pytest.raises(PersonalDataError) as streamed:
        _new(tmp_path, mapping, landing, date(2025, 1, 4))
    assert str(streamed.value) == str(whole.value)
    assert not list((tmp_path / "new").rglob("*.parquet"))


def test_undeclared_personal_data_arriving_tonight_stops_an_incremental_night_in_both(tmp_path, sizes):
    mapping = load_mapping("sample")
    days = {f"2025-01-0{d}": [f'"O{d}","C{d}","2025-01-0{d} 09:00:00","P1","1","2"'] for d in range(1, 4)}
    days["2025-01-04"] = [f'"O4{i}","c4{i}@example.com","2025-01-04 09:00:00","P1","1","2"' for i in range(9)]
    landing = _landing(tmp_path, days)
    yesterday, counts, record = _old(mapping, landing, date(2025, 1, 3))
    raw = RunStore(tmp_path / "yesterday", date(2025, 1, 3)).write_frame("raw", "order_lines", yesterday)
    counted = counts["exact_duplicate_rows"]
    with pytest.raises(PersonalDataError) as whole:
        _old(mapping, landing, date(2025, 1, 4), History(yesterday, record["files"], None, counted))
    with pytest.raises(PersonalDataError) as streamed:
        _new(tmp_path, mapping, landing, date(2025, 1, 4), History(None, record["files"], None, counted, raw))
    assert str(streamed.value) == str(whole.value)
    assert not list((tmp_path / "new").rglob("*.parquet"))
