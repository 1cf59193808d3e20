"""The order lines validated a batch at a time write what the whole-table validation wrote.

``whole_table`` below is validate's order-line path before batching, kept as the definition: validate every
entity whole (``validate_all``), pseudonymise, split the valid lines by customer, write. The batched path
(``tasks.validate._validate_lines``) must give the same parts (the same rows, in the same order in each part),
the same quarantine table and the same metrics, cascade, gate message and GX cross-check, at any batch size and
part count. The data has a dirty line for every reason of the suite and cascades from both upstream entities.
"""

from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from crm_analytics.artifacts import RunStore
from crm_analytics.mapping import EntitySource, SourceMapping
from crm_analytics.parameters import ValidationOptions
from crm_analytics.partitions import split_table_by_customer
from tasks.common import DataQualityError
from tasks.suites import cross_check_positions
from tasks.validate import (
    BatchedValidation,
    _validate_lines,
    before_all_data,
    check_gates,
    load_suite,
    personal_columns,
    publishable_outcomes,
    referential_parameters,
    suite_parameters,
    validate_all,
    validation_metrics,
)
from tests.test_validate_bad_values import customer, customers, line, lines, products

AS_OF = date(2025, 12, 31)
KEY = b"k" * 32
NO_CROSS_CHECK = ValidationOptions(max_quarantine_rate=1.0, cross_check_rows=0)
MAPPING = SourceMapping(entities={
    "customers": EntitySource(files="c.csv", keep=["full_name"], pii=["full_name"]),
    "products": EntitySource(files="p.csv"),
    "order_lines": EntitySource(files="l.csv"),
})


def dirty_export() -> dict[str, pd.DataFrame]:
    """10 customers (C03 and C07 quarantined), 4 products (P2 quarantined); 26 good lines spread over the
    customers and a dirty line for every reason of the order-line suite, the cascades' lines far apart (so a
    key's lines fall in several batches), one line failing its own check as well as cascading."""
    good = [line(n, customer_id=f"C{1 + n * 7 % 10:02d}", product="P1" if n % 3 else "P3") for n in range(26)]
    good = [row for row in good if row[1] not in ("C03", "C07")]
    dirty = [
        line(100, quantity="abc"),  # does not parse
        line(101, customer_id=None), line(102, product=None), line(103, ts=None), line(104, quantity=None),
        line(105, price=None), (None, "C02", "2025-06-01 10:00:00", "P1", 1, 2.5),
        line(106, ts="1850-03-01 00:00:00"), line(107, ts="2026-02-01 00:00:00"),
        line(108, quantity=200000), line(109, quantity=0), line(110, price=-1),
        line(111, customer_id="C99"), line(112, product="P9"),
        line(113, customer_id="C03"), line(114, customer_id="C07", product="P2"), line(115, product="P2"),
        line(116, customer_id="C03", quantity=0),  # its own reason: "other", not the cascade
    ]
    rows = []
    for i, row in enumerate(good):  # interleaved, so every batch size sees clean and dirty lines
        rows.append(row)
        if i < len(dirty):
            rows.append(dirty[i])
    rows += dirty[len(good):] + [line(117, customer_id="C03"), line(118, customer_id="C07")]
    return {
        "customers": customers(*[customer(i, birth_year=2099 if i == 3 else 1980,
                                          gender="female" if i == 7 else "F") for i in range(1, 11)]),
        "products": products(("P1", "home", "Mug", "2.5"), ("P2", "home", "Cup", "-5"), ("P3", "toys", "Top", "4")),
        "order_lines": lines(*rows),
    }


def whole_table(store: RunStore, frames: dict[str, pd.DataFrame], options: ValidationOptions, partitions: int,
                as_of: date = AS_OF):
    """The order lines as validate wrote them before batching (the definition the batched path must meet)."""
    outcomes = validate_all(frames, MAPPING, as_of, options)
    published = publishable_outcomes(outcomes, MAPPING, KEY)["order_lines"]
    valid = store.write_partitioned("validated", "order_lines",
                                    split_table_by_customer(published.valid, partitions))
    quarantine = store.write_frame("quarantine", "order_lines", published.quarantine)
    return valid, quarantine, outcomes


def batched(store: RunStore, frames: dict[str, pd.DataFrame], options: ValidationOptions, partitions: int,
            batch_rows: int, as_of: date = AS_OF):
    """The order lines through validate's batched path, from an ingested table as ingest writes it."""
    personal = personal_columns(frames, MAPPING)
    upstream = validate_all({e: f for e, f in frames.items() if e != "order_lines"}, MAPPING, as_of, options,
                            personal)
    ingested = store.write_frame("raw", "order_lines", frames["order_lines"])
    parameters = {**suite_parameters(as_of, options.earliest_date), **referential_parameters(upstream)}
    written, summary = _validate_lines(store, ingested, ingested.rows, MAPPING.source("order_lines"), parameters,
                                       upstream, options, personal, KEY, batch_rows, partitions)
    return written["order_lines"], written["quarantine_order_lines"], {**upstream, "order_lines": summary}


def assert_same_tables(old_valid, old_quarantine, new_valid, new_quarantine) -> None:
    assert new_valid.parts == old_valid.parts and new_valid.rows == old_valid.rows
    for old_part, new_part in zip(old_valid.part_files, new_valid.part_files, strict=True):
        pd.testing.assert_frame_equal(pq.read_table(new_part).to_pandas(), pq.read_table(old_part).to_pandas())
    assert new_valid.schema_fingerprint == old_valid.schema_fingerprint
    pd.testing.assert_frame_equal(RunStore.read_frame(new_quarantine), RunStore.read_frame(old_quarantine))
    assert new_quarantine.rows == old_quarantine.rows
    assert new_quarantine.schema_fingerprint == old_quarantine.schema_fingerprint


def assert_same_metrics(old: dict, new: dict) -> None:
    assert new == old
    for entity in old:  # the order of reasons (the report's "top reasons") too
        assert list(new[entity]["reasons"]) == list(old[entity]["reasons"])
        for cause in old[entity].get("cascade", {}).values():
            assert list(new[entity]["cascade"]) == list(old[entity]["cascade"])
            assert list(cause["reasons"]) in [list(c["reasons"]) for c in new[entity]["cascade"].values()]


def test_the_export_has_a_dirty_line_for_every_reason_and_both_cascades():
    outcomes = validate_all(dirty_export(), MAPPING, AS_OF, NO_CROSS_CHECK)
    reasons = {e["meta"]["reason"].replace("{earliest_date}", "1990-01-01")
               for e in load_suite("order_lines")["expectations"]}
    assert set(outcomes["order_lines"].reason_counts) == reasons
    assert set(outcomes["order_lines"].cascade) == {"customers", "products", "other"}


@pytest.mark.parametrize("partitions", [1, 2, 3, 7])
@pytest.mark.parametrize("batch_rows", [1, 2, 3, 7])
def test_batches_write_the_tables_and_metrics_of_the_whole_table(tmp_path: Path, batch_rows: int, partitions: int):
    frames = dirty_export()
    old_valid, old_quarantine, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, NO_CROSS_CHECK,
                                                 partitions)
    new_valid, new_quarantine, new = batched(RunStore(tmp_path / "new", AS_OF), frames, NO_CROSS_CHECK, partitions,
                                             batch_rows)
    assert_same_tables(old_valid, old_quarantine, new_valid, new_quarantine)
    assert_same_metrics(validation_metrics(old, MAPPING, NO_CROSS_CHECK),
                        validation_metrics(new, MAPPING, NO_CROSS_CHECK))


@pytest.mark.parametrize("batch_rows", [1, 7, 1000])
def test_the_gate_says_the_same_of_batches(tmp_path: Path, batch_rows: int):
    frames, gate = dirty_export(), ValidationOptions(cross_check_rows=0)
    *_, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, gate, 3)
    *_, new = batched(RunStore(tmp_path / "new", AS_OF), frames, gate, 3, batch_rows)
    with pytest.raises(DataQualityError) as whole:
        check_gates(old, MAPPING, gate, AS_OF)
    with pytest.raises(DataQualityError) as in_batches:
        check_gates(new, MAPPING, gate, AS_OF)
    assert str(in_batches.value) == str(whole.value)
    assert "because their customer is quarantined" in str(whole.value)


def test_an_as_of_date_before_every_line_is_told_the_same(tmp_path: Path):
    frames = dirty_export()
    dated = frames["order_lines"]["order_ts"] >= pd.Timestamp("2025-01-01", tz="UTC")
    frames["order_lines"] = frames["order_lines"][dated.fillna(False)].reset_index(drop=True)
    as_of = date(2025, 5, 1)  # every line is from June 2025 or later; the customers signed up in 2024
    *_, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, NO_CROSS_CHECK, 2, as_of)
    *_, new = batched(RunStore(tmp_path / "new", AS_OF), frames, NO_CROSS_CHECK, 2, 3, as_of)
    text = before_all_data({"order_lines": old["order_lines"]}, as_of)
    assert text is not None and "order_lines" in text and "2025-06-01" in text
    assert before_all_data({"order_lines": new["order_lines"]}, as_of) == text


def test_the_cross_check_samples_the_rows_it_samples_of_the_whole_table(tmp_path: Path, monkeypatch):
    """GX sees the same rows (labelled by their position in the whole table) whether the table is whole or in
    batches: sampled once over all rows, gathered from the batches, checked once at the end."""
    import tasks.suites
    import tasks.validate

    samples: dict[str, list[pd.DataFrame]] = {"old": [], "new": []}

    def recorder(which: str):
        def cross_check(frame, suite, compiled, parameters, sample_rows, seed=0):
            if suite["name"] == "order_lines" and sample_rows > 0 and not frame.empty:
                chosen = frame.take(cross_check_positions(len(frame), sample_rows, seed)) \
                    if len(frame) > sample_rows else frame
                samples[which].append(chosen)
                return len(chosen)
            return 0
        return cross_check

    frames, options = dirty_export(), ValidationOptions(max_quarantine_rate=1.0, cross_check_rows=9)
    monkeypatch.setattr(tasks.suites, "cross_check", recorder("old"))
    *_, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, options, 2)
    monkeypatch.setattr(tasks.validate, "cross_check", recorder("new"))
    monkeypatch.setattr(tasks.suites, "cross_check", recorder("ignored"))  # the batches' own (sample_rows 0)
    *_, new = batched(RunStore(tmp_path / "new", AS_OF), frames, options, 2, 4)
    assert len(samples["old"]) == len(samples["new"]) == 1
    pd.testing.assert_frame_equal(samples["new"][0], samples["old"][0])
    assert new["order_lines"].evaluation == old["order_lines"].evaluation
    assert old["order_lines"].evaluation["cross_checked_rows"] == 9


@pytest.mark.slow
def test_great_expectations_agrees_on_the_sample_gathered_from_batches(tmp_path: Path):
    frames, options = dirty_export(), ValidationOptions(max_quarantine_rate=1.0, cross_check_rows=12)
    *_, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, options, 3)
    *_, new = batched(RunStore(tmp_path / "new", AS_OF), frames, options, 3, 5)
    assert new["order_lines"].evaluation == old["order_lines"].evaluation
    assert new["order_lines"].evaluation["cross_checked_rows"] == 12


def test_an_empty_table_of_lines_is_one_empty_batch(tmp_path: Path):
    frames = dirty_export()
    frames["order_lines"] = frames["order_lines"].iloc[:0]
    old_valid, old_quarantine, old = whole_table(RunStore(tmp_path / "old", AS_OF), frames, NO_CROSS_CHECK, 2)
    new_valid, new_quarantine, new = batched(RunStore(tmp_path / "new", AS_OF), frames, NO_CROSS_CHECK, 2, 3)
    assert_same_tables(old_valid, old_quarantine, new_valid, new_quarantine)
    assert validation_metrics(new, MAPPING, NO_CROSS_CHECK) == validation_metrics(old, MAPPING, NO_CROSS_CHECK)


def test_rows_sharing_source_lines_are_validated_in_one_batch(tmp_path: Path):
    """A basket's items share their source line, counted once over all rows: batches would count it twice."""
    baskets = SourceMapping(entities={**MAPPING.entities, "order_lines": EntitySource(files="b.txt", format="baskets")})
    frames = dirty_export()
    outcomes = validate_all(frames, baskets, AS_OF, NO_CROSS_CHECK)
    parameters = {**suite_parameters(AS_OF), **referential_parameters(outcomes)}
    rows = len(frames["order_lines"])
    one = BatchedValidation(load_suite("order_lines"), parameters, rows, cross_check_rows=0, upstream=outcomes,
                            shared_lines=True)
    one.validate(frames["order_lines"])
    assert one.summary().lines_in == validation_metrics(outcomes, baskets, NO_CROSS_CHECK)["order_lines"]["lines_in"]
    two = BatchedValidation(load_suite("order_lines"), parameters, rows, cross_check_rows=0, shared_lines=True)
    two.validate(frames["order_lines"].iloc[:5])
    with pytest.raises(ValueError, match="one batch"):
        two.validate(frames["order_lines"].iloc[5:])
