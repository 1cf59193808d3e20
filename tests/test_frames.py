"""The one exact duplicate-row definition (``crm_analytics.frames``), and validation using it: a 64-bit hash
collision must never give a row another row's verdict."""

from datetime import date

import numpy as np
import pandas as pd

from crm_analytics.frames import exact_duplicate_rows, first_copies, lines_covered
from tasks.validate import load_suite, suite_parameters, validate_entity
from tests.test_validate import _customers


def _constant_hash(monkeypatch) -> None:
    """Every row hashes alike: only the exact comparison can tell rows apart."""
    monkeypatch.setattr(pd.util, "hash_pandas_object",
                        lambda f, index=False: pd.Series(np.zeros(len(f), dtype=np.uint64)))


ROWS = [
    ("c1", "2024-01-01", 1980),
    ("c2", "2024-01-01", 1850),  # implausible birth year: quarantined, whatever row 1 says
    ("c1", "2024-01-01", 1980),  # exact copy of row 1: kept, with row 1's verdict
    ("c3", "2024-01-01", 1990),
    ("c3", "2024-03-01", 1990),  # same id, different data: both quarantined
]


def test_first_copies_name_each_rows_first_exact_copy_with_duplicated_semantics():
    frame = pd.DataFrame({"x": [0.0, -0.0, np.nan, np.nan, 1.0, 0.0],
                          "s": pd.array(["a", "a", None, None, "b", "c"], dtype="string")})
    assert first_copies(frame, ["x", "s"]).tolist() == [0, 0, 2, 2, 4, 5]
    np.testing.assert_array_equal(exact_duplicate_rows(frame, ["x", "s"]), frame.duplicated(keep="first"))


def test_validation_gives_each_row_its_own_verdict_when_every_row_hash_collides(monkeypatch):
    suite, parameters = load_suite("customers"), suite_parameters(date(2025, 1, 31))
    expected = validate_entity(_customers(ROWS), suite, parameters)
    assert expected.valid["customer_id"].tolist() == ["c1", "c1"]
    assert expected.quarantine["customer_id"].tolist() == ["c2", "c3", "c3"]
    _constant_hash(monkeypatch)
    collided = validate_entity(_customers(ROWS), suite, parameters)  # a hash-only comparison merged all five
    pd.testing.assert_frame_equal(collided.valid, expected.valid)
    pd.testing.assert_frame_equal(collided.quarantine, expected.quarantine)
    assert collided.reason_counts == expected.reason_counts


def test_lines_covered_counts_a_shared_basket_line_once_across_valid_and_quarantined_rows():
    valid = pd.DataFrame({"_source_file": ["b.csv", "b.csv", "a.csv"], "_source_line": [1, 1, 2],
                          "_source_lines": [1, 1, 3]})
    quarantined = pd.DataFrame({"_source_file": ["b.csv"], "_source_line": [1], "_source_lines": [1]})
    assert lines_covered(valid, quarantined, shared_lines=True) == 4  # b.csv line 1 once, a.csv lines 2-4
    assert lines_covered(valid, quarantined) == 6  # one row a line: the plain sum
    assert lines_covered(pd.DataFrame({"customer_id": ["c1", "c2"]})) == 2  # no lineage (SQL, derived): a row each


def test_without_rows_keeps_the_columns_and_types_but_none_of_the_memory():
    import gc

    import pyarrow as pa

    from crm_analytics.frames import without_rows

    def arrow_mb() -> float:
        gc.collect()
        return pa.total_allocated_bytes() / 2**20

    before = arrow_mb()
    frame = pd.DataFrame({"customer_id": pd.array([f"customer-{i:09d}" for i in range(500_000)], dtype="str"),
                          "quantity": pd.array(range(500_000), dtype="Int64"),
                          "order_ts": pd.date_range("2025-01-01", periods=500_000, freq="s", tz="UTC")})
    assert arrow_mb() - before > 5  # the text column lives in Arrow memory
    sliced, empty, types = frame.iloc[:0].copy(), without_rows(frame), frame.dtypes.to_dict()
    del frame
    assert arrow_mb() - before > 5  # an empty slice, even copied, still holds the column's buffers
    del sliced
    assert arrow_mb() - before < 1
    assert empty.empty and empty.dtypes.to_dict() == types
