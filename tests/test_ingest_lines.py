"""Exact line accounting in ingest: every physical line of a text file is counted from its bytes, every row knows
the lines it came from, and the two reconcile; rows over several lines, with a wrong field count or on a last
line without a line break are kept and flagged, with messages that name lines and counts, never values."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.ingest.readers as ingest
from crm_analytics.mapping import CsvOptions, EntitySource, SourceMapping
from crm_analytics.schema import PARSE_ERRORS, QUARANTINE_REASON, SOURCE_FILE, SOURCE_LINE, SOURCE_LINES
from tasks.clean import drop_exact_duplicates
from tasks.common import SourceSchemaError
from tasks.ingest import count_data_lines, ingest_metrics, parse_entity, read_source_text
from tasks.ingest.lines import line_table, place_records
from tasks.validate import load_suite, suite_parameters, validate_entity

SECRET = "zoe.private@example.com"  # a planted personal value: it must never appear in a message


def _read(tmp_path, data: bytes, name: str = "c.csv", **csv) -> tuple[pd.DataFrame, ingest.LineCount]:
    path = tmp_path / name
    path.write_bytes(data)
    source = EntitySource(files=name, csv=CsvOptions(**csv))
    return read_source_text(path, source), count_data_lines(path, source)


def _errors(frame: pd.DataFrame) -> list[str | None]:
    return [None if pd.isna(e) else e for e in frame[PARSE_ERRORS]]


def _assert_accounted(frame: pd.DataFrame, count: ingest.LineCount) -> None:
    assert int(frame[SOURCE_LINES].sum()) == count.data_lines


def _assert_no_secret(frame: pd.DataFrame) -> None:
    assert not any(SECRET in e for e in _errors(frame) if e)


def test_line_table_counts_lf_crlf_lone_cr_and_a_last_line_without_break():
    table = line_table(b"h\na\r\nb\rc\r\r\nd", positions=True)  # h | a | b | c | (blank) | d
    assert [(int(s), int(e)) for s, e in zip(table.starts, table.ends, strict=True)] == [
        (0, 1), (2, 3), (5, 6), (7, 8), (9, 9), (11, 12)]
    assert table.blank.tolist() == [False, False, False, False, True, False]
    assert table.final_newline is False
    assert line_table(b"").blank.tolist() == [] and line_table(b"").final_newline
    assert line_table(b"a\n\n").blank.tolist() == [False, True]  # the final break starts no line
    assert line_table(b"  \t\nx\n", b" \t").blank.tolist() == [True, False]


def test_the_quick_count_of_plain_lf_files_equals_the_full_scan():
    rng = np.random.default_rng(3)
    for _ in range(200):
        data = bytes(rng.choice(list(b"ab,\n"), size=int(rng.integers(0, 30))))
        quick, full = line_table(data), line_table(data, positions=True)
        assert quick.blank.tolist() == full.blank.tolist() and quick.final_newline == full.final_newline, data


def test_blank_lines_are_counted_apart_and_rows_keep_their_physical_lines(tmp_path):
    frame, count = _read(tmp_path, b"id,name,price\n1,a,1.5\n\n2,b,2.5\n\n\n3,c,3\n")
    assert count == ingest.LineCount(data_lines=3, blank_lines=3, final_newline=True)
    assert frame[SOURCE_LINE].tolist() == [2, 4, 7]
    assert frame[SOURCE_LINES].tolist() == [1, 1, 1]
    assert _errors(frame) == [None, None, None]
    _assert_accounted(frame, count)


@pytest.mark.parametrize("data", [
    b"id,name,price\r\n1,a,1\r\n2,b,2\r\n\r\n3,c,3\r\n",   # CRLF
    b"id,name,price\r1,a,1\r2,b,2\r\r3,c,3\r",              # CR only (old Mac exports)
    b"id,name,price\n1,a,1\r2,b,2\r\n\n3,c,3\r\n",          # a mix
])
def test_crlf_cr_and_mixed_line_ends_give_the_same_lines(tmp_path, data):
    frame, count = _read(tmp_path, data)
    assert frame["price"].tolist() == ["1", "2", "3"]
    assert frame[SOURCE_LINE].tolist() == [2, 3, 5]
    assert count == ingest.LineCount(3, 1, True)
    _assert_accounted(frame, count)


def test_a_stray_quote_that_merges_three_lines_is_one_flagged_row_covering_all_three(tmp_path):
    data = (b"id,name,price\n1,a,1.00\n2,\"Widget,2.00\n3," + SECRET.encode() + b",3.00\n4,d\",4.00\n5,e,5.00\n")
    frame, count = _read(tmp_path, data)
    assert count.data_lines == 5
    assert frame["id"].tolist() == ["1", "2", "5"]
    assert frame[SOURCE_LINE].tolist() == [2, 3, 6]
    assert frame[SOURCE_LINES].tolist() == [1, 3, 1]
    assert _errors(frame) == [None, "row spans lines 3-5 (a quoted field holds a line break: unbalanced quote?)", None]
    _assert_accounted(frame, count)
    _assert_no_secret(frame)


def test_multi_line_values_are_accepted_with_the_option_and_keep_their_lines(tmp_path):
    data = b"id,note,price\n1,\"first\n\nthird\",1\n2,b,2\n"
    flagged, count = _read(tmp_path, data)
    assert _errors(flagged) == ["row spans lines 2-4 (a quoted field holds a line break: unbalanced quote?)", None]
    accepted, _ = _read(tmp_path, data, multiline_values=True)
    assert accepted["note"].tolist() == ["first\n\nthird", "b"]
    assert _errors(accepted) == [None, None]
    assert accepted[SOURCE_LINE].tolist() == [2, 5]
    # A blank line inside a quoted value belongs to its row but, like every blank line, is not a data line.
    assert accepted[SOURCE_LINES].tolist() == [2, 1]
    assert count == ingest.LineCount(3, 1, True)
    _assert_accounted(accepted, count)


def test_a_quote_left_open_to_the_end_of_the_file_flags_the_row_where_it_opened(tmp_path):
    data = b"id,name,price\n1,a,1\n2,b,\"2\n3," + SECRET.encode() + b",3\n"
    for options in ({}, {"multiline_values": True}):  # an unclosed quote is an error even where values may span
        frame, count = _read(tmp_path, data, **options)
        assert frame[SOURCE_LINE].tolist() == [2, 3]
        assert frame[SOURCE_LINES].tolist() == [1, 2]
        assert _errors(frame) == [None, "line 3 opens a quoted field that runs to the end of the file "
                                        "(unbalanced quote?)"]
        _assert_accounted(frame, count)
        _assert_no_secret(frame)


def test_rows_with_too_few_or_too_many_fields_are_kept_empty_and_flagged_in_place(tmp_path):
    data = (b"id,name,price\n1,a,1\n2," + SECRET.encode() + b"\n\n3,c,3,extra\n4,\"d\ne\",4\n5," + SECRET.encode()
            + b",5,6\n6,f,6\n")
    frame, count = _read(tmp_path, data)
    assert count == ingest.LineCount(7, 1, True)
    assert frame[SOURCE_LINE].tolist() == [2, 3, 5, 6, 8, 9]
    assert frame[SOURCE_LINES].tolist() == [1, 1, 1, 2, 1, 1]
    assert frame["id"].tolist()[:1] + frame["id"].tolist()[3:4] + frame["id"].tolist()[5:] == ["1", "4", "6"]
    assert frame.iloc[[1, 2, 4]][["id", "name", "price"]].isna().all().all()  # their values are not guessed
    assert _errors(frame) == [None, "line 3 has 2 fields, expected 3", "line 5 has 4 fields, expected 3",
                              "row spans lines 6-7 (a quoted field holds a line break: unbalanced quote?)",
                              "line 8 has 4 fields, expected 3", None]
    _assert_accounted(frame, count)
    _assert_no_secret(frame)


def test_rejected_rows_are_placed_exactly_in_a_large_file_read_with_threads(tmp_path):
    good = b"".join(b"%d,n%d,1.5\n" % (i, i) for i in range(200_000))
    data = b"id,name,price\n" + good + b"x,y\n" + good + b"\"a\nb\",c\n" + good
    frame, count = _read(tmp_path, data)
    bad = frame.index[frame[PARSE_ERRORS].notna()].tolist()
    assert bad == [200_000, 400_001]
    assert frame[SOURCE_LINE].iloc[bad].tolist() == [200_002, 400_003]
    assert frame[SOURCE_LINE].iloc[-1] == 600_004
    _assert_accounted(frame, count)


def test_a_file_without_header_numbers_its_rejected_rows_from_line_1(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"1,a\n2\n\n3,c\n")
    frame = read_source_text(path, EntitySource(files="c.csv", csv=CsvOptions(header=False,
                                                                              column_names=["id", "name"])))
    assert frame[SOURCE_LINE].tolist() == [1, 2, 4]
    assert _errors(frame) == [None, "line 2 has 1 fields, expected 2", None]


def test_a_row_wider_than_the_readers_block_is_read(tmp_path):
    frame, count = _read(tmp_path, b"id,name,price\n1," + b"x" * 3_000_000 + b",1\n2,b,2\n")
    assert frame["id"].tolist() == ["1", "2"] and frame[SOURCE_LINE].tolist() == [2, 3]
    _assert_accounted(frame, count)


def test_parser_errors_name_the_file_and_the_kind_of_problem_never_the_row(tmp_path):
    path = tmp_path / "c.csv"
    data = b"id,email\n" + b"0,a\n" * 20_000 + b"1," + SECRET.encode() + b"\xff\n"  # past the header's read
    path.write_bytes(data)
    with pytest.raises(SourceSchemaError) as error:  # read_delimited without check_text_file's scan before it
        ingest.read_delimited(path, EntitySource(files="c.csv"), data)
    assert "c.csv" in str(error.value) and "not valid UTF-8" in str(error.value)
    assert SECRET not in str(error.value) and error.value.__context__ is None and error.value.__cause__ is None


def test_a_last_line_without_a_line_break_is_flagged_unless_the_option_says_otherwise(tmp_path):
    data = b"id,name,price\n1,a,1.00\n2,b,12."  # 12.99 cut off
    frame, count = _read(tmp_path, data)
    assert count == ingest.LineCount(2, 0, False)
    assert _errors(frame) == [None, "line 3 ends the file without a line break: the file may be cut off"]
    accepted, _ = _read(tmp_path, data, require_final_newline=False)
    assert _errors(accepted) == [None, None]
    _assert_accounted(frame, count)


def test_a_file_with_only_a_header_has_no_data_lines(tmp_path):
    frame, count = _read(tmp_path, b"id,name,price\n")
    assert len(frame) == 0 and count == ingest.LineCount(0, 0, True)


def test_whitespace_files_count_blank_lines_of_blanks_and_flag_wrong_field_counts(tmp_path):
    data = b"id day n dollars\r 1 19970101 1 11.77\r   \r\t2 19970102 2\r3 19970103 3 9.50 " + SECRET.encode() + b"\r\r"
    frame, count = _read(tmp_path, data, name="w.txt", delimiter="whitespace")
    assert count == ingest.LineCount(3, 2, True)
    assert frame["id"].tolist() == ["1", "2", "3"]
    assert frame[SOURCE_LINE].tolist() == [2, 4, 5]
    assert frame[SOURCE_LINES].tolist() == [1, 1, 1]
    assert _errors(frame) == [None, "line 4 has 3 fields, expected 4", "line 5 has 5 fields, expected 4"]
    assert frame.columns.tolist()[:4] == ["id", "day", "n", "dollars"]  # the extra field is dropped
    _assert_accounted(frame, count)
    _assert_no_secret(frame)
    cut, _ = _read(tmp_path, b"id day n dollars\n1 19970101 1 11.7", name="w.txt", delimiter="whitespace")
    assert _errors(cut) == ["line 2 ends the file without a line break: the file may be cut off"]


def test_basket_lists_account_for_every_line(tmp_path):
    path = tmp_path / "baskets.csv"
    path.write_bytes(b"milk,bread\n\n , ,\n\"\"\ntea,\"green\ncoffee\"\nsugar")
    source = EntitySource(files="baskets.csv", format="baskets", csv=CsvOptions(header=False, column_names=["x"]))
    frame, count = read_source_text(path, source), count_data_lines(path, source)
    assert count == ingest.LineCount(5, 2, False)  # lines 2 (empty) and 3 (separators only) are empty baskets
    assert frame["basket"].tolist() == ["1", "1", "4", "5", "5", "7"]
    assert frame["item"].tolist()[:2] == ["milk", "bread"] and pd.isna(frame["item"].iloc[2])
    assert frame[SOURCE_LINE].tolist() == [1, 1, 4, 5, 5, 7]
    assert frame[SOURCE_LINES].tolist() == [1, 1, 1, 2, 2, 1]
    assert _errors(frame) == [None, None, "line 4 has no item",
                              "row spans lines 5-6 (a quoted field holds a line break: unbalanced quote?)",
                              "row spans lines 5-6 (a quoted field holds a line break: unbalanced quote?)",
                              "line 7 ends the file without a line break: the file may be cut off"]
    assert int(frame.drop_duplicates(SOURCE_LINE)[SOURCE_LINES].sum()) == count.data_lines


def test_parquet_rows_are_counted_from_the_metadata(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["1", "2", "3"]}), path)
    source = EntitySource(files="c.parquet", format="parquet")
    frame = read_source_text(path, source)
    assert count_data_lines(path, source) == ingest.LineCount(3, 0, True)
    assert frame[SOURCE_LINE].tolist() == [2, 3, 4] and frame[SOURCE_LINES].tolist() == [1, 1, 1]


def test_rows_that_do_not_cover_the_counted_lines_stop_the_read_naming_the_file_and_both_numbers(tmp_path,
                                                                                                 monkeypatch):
    # A parser that merged lines without the values showing it: the rows would cover fewer lines than counted.
    monkeypatch.setattr(ingest, "_breaks_per_row", lambda table: np.zeros(table.num_rows, dtype=np.int64))
    with pytest.raises(SourceSchemaError) as error:
        _read(tmp_path, b"id,name,price\n1,a,1\n2,\"b\n3," + SECRET.encode() + b"\n4,d\",4\n")
    message = str(error.value)
    assert "c.csv" in message and "4 non-blank" in message and SECRET not in message
    with pytest.raises(ValueError, match="do not cover the 3 non-blank lines"):
        place_records(np.array([False, False, False]), np.array([1, 1]), True)
    with pytest.raises(ValueError, match="runs past the end"):
        place_records(np.array([False, False]), np.array([1, 3]), False)


def _mapping() -> SourceMapping:
    return SourceMapping.model_validate({"entities": {
        "customers": {"files": "customers.csv", "columns": {"customer_id": "id"}, "pii": ["email"]},
        "churn_labels": {"files": "labels.csv"},
    }})


def test_row_flags_reach_parse_errors_metrics_and_quarantine_and_clean_drops_the_lineage(tmp_path):
    data = (b"id,email,birth_year\nc1,a@example.com,1980\nc2,\"" + SECRET.encode() + b"\nc3,x,1990\",1970\n"
            b"c4,d@example.com\nc5,e@example.com,19x0\nc6,f@example.com,1985")
    mapping = _mapping()
    path = tmp_path / "customers.csv"
    path.write_bytes(data)
    text = read_source_text(path, mapping.entities["customers"])
    text[SOURCE_FILE] = "customers.csv"
    frame = parse_entity(text, "customers", mapping, "customers.csv")
    assert frame[SOURCE_LINES].tolist() == [1, 2, 1, 1, 1]
    assert _errors(frame) == [None, "row spans lines 3-4 (a quoted field holds a line break: unbalanced quote?)",
                              "line 5 has 2 fields, expected 3", "birth_year='19x0'",
                              "line 7 ends the file without a line break: the file may be cut off"]
    metrics = ingest_metrics(frame, "customers", mapping.entities["customers"])
    assert {k: metrics[k] for k in ("rows", "data_lines", "multiline_rows", "bad_field_count_rows",
                                    "unterminated_last_lines")} == {
        "rows": 5, "data_lines": 6, "multiline_rows": 1, "bad_field_count_rows": 1, "unterminated_last_lines": 1}
    assert metrics["data_lines"] == count_data_lines(path, mapping.entities["customers"]).data_lines
    outcome = validate_entity(frame, load_suite("customers"), suite_parameters(date(2025, 1, 31)))
    assert outcome.valid["customer_id"].tolist() == ["c1"]
    assert outcome.quarantine[SOURCE_LINE].tolist() == [3, 5, 6, 7]  # the truncated row at 5 has no values
    assert outcome.quarantine[QUARANTINE_REASON].notna().all()
    assert SOURCE_LINES in outcome.valid.columns  # validated/ keeps the lineage
    cleaned, _ = drop_exact_duplicates(outcome.valid)
    assert not any(c.startswith("_source") for c in cleaned.columns)
    _assert_no_secret(frame)


def test_counting_ten_million_lines_is_vectorised(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(b"id\n" + b"1\n" * 10_000_000)
    import time

    started = time.perf_counter()
    assert count_data_lines(path, EntitySource(files="big.csv")).data_lines == 10_000_000
    assert time.perf_counter() - started < 5  # a loop over lines in Python takes well over this
