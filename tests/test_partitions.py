"""Customer-partitioned order lines: the store's partitioned tables, and clean and features a partition at a
time, compared with the single-frame definitions on small hand-made data."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from crm_analytics.artifacts import RunStore, StageResult, is_intact
from crm_analytics.partitions import (
    PartitionMismatchError,
    checked_partitions,
    customer_partition,
    split_by_customer,
)
from tasks.clean import (
    CLEAN_LINE_ORDER,
    CleanPart,
    clean_and_merge,
    clean_dimensions,
    clean_parts,
    clean_stats,
    line_counts_of,
)
from tasks.features import CATEGORY_VALUE_COLUMNS, build_customer_features, features_by_part

AS_OF = date(2025, 3, 31)


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Customers (one exact and one conflicting duplicate), products (two spellings of one name) and lines with
    exact duplicates, returns netted in full, in part and not at all, a cancellation at its purchase's instant,
    incomplete lines, unknown customers and products, lines after the as-of date, and two customers ordering at
    the same instant."""
    customers = pd.DataFrame({
        "customer_id": ["c1", "c1", "c2", "c3", "c3", "c4", "c5", "c6"],
        "signup_date": pd.to_datetime(["2024-01-01", "2024-01-01", "2024-02-01", "2024-03-01", "2024-05-01",
                                       None, "2024-01-15", "2024-06-01"], utc=True),
        "country": ["UK", "UK", "FR", "DE", "DE", "UK", "FR", "ES"],
        "_source_file": "c.csv", "_source_line": range(2, 10),
    })
    products = pd.DataFrame({
        "product_id": ["p1", "p1", "p2", "p3", "p4"], "category": ["home", "home", "toys", " garden ", "toys"],
        "name": ["Mug red", " Mug  red", "Ball", "Rake", "Kite"], "list_price": [3.0, 3.0, 5.0, 9.0, 4.0],
        "_source_file": "p.csv", "_source_line": range(2, 7),
    })
    rows = [
        ("o1", "c1", "2025-01-01 10:00", "p1", 2, 3.0), ("o1", "c1", "2025-01-01 10:00", "p1", 2, 3.0),  # duplicate
        ("o1", "c1", "2025-01-01 10:00", "p2", 1, 5.0), ("R1", "c1", "2025-01-03 10:00", "p1", -1, 3.0),
        ("o2", "c2", "2025-01-01 10:00", "p2", 3, 5.0), ("R2", "c2", "2025-01-05 09:00", "p2", -5, 5.0),  # in part
        ("o3", "c3", "2025-02-01 12:00", "p3", 1, 9.0), ("C3", "c3", "2025-02-01 12:00", "p3", -1, 9.0),  # same instant
        ("C4", "c4", "2025-01-02 08:00", "p4", -2, 4.0),  # nothing bought before: unmatched
        ("o4", "c4", "2025-01-04 08:00", "p4", 1, 4.0), ("o5", "c5", "2025-03-01 10:00", "p1", 4, 2.5),
        ("o6", "c5", "2025-03-02 10:00", "p3", 1, 9.0), ("o7", "c6", "2025-03-01 10:00", "p4", 2, 4.0),
        ("o8", "c6", "2025-04-15 10:00", "p4", 1, 4.0),  # after the as-of date
        ("o9", None, "2025-01-01 10:00", "p1", 1, 3.0),  # incomplete
        ("o10", "c2", "2025-01-07 10:00", "p1", 0, 3.0),  # zero quantity: incomplete
        ("o11", "cX", "2025-01-07 10:00", "p1", 1, 3.0),  # unknown customer
        ("o12", "c2", "2025-01-07 10:00", "pX", 1, 3.0),  # unknown product
        ("o13", "c2", "2025-02-10 10:00", "p1", 1, 3.0), ("o13", "c2", "2025-02-10 10:00", "p3", 2, 9.0),
        ("o14", "c5", "2025-02-10 10:00", "p2", 1, 5.0),
    ]
    lines = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"])
    lines["order_ts"] = pd.to_datetime(lines["order_ts"], utc=True)
    lines["_source_file"], lines["_source_line"] = "o.csv", range(2, 2 + len(lines))
    return customers, products, lines


def _random_lines(n: int = 2_000, seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Many customers and products, with duplicates and returns: every path of clean on more than one part."""
    rng = np.random.default_rng(seed)
    customers = pd.DataFrame({"customer_id": [f"c{i}" for i in range(120)],
                              "signup_date": pd.Timestamp("2024-01-01", tz="UTC")
                              + pd.to_timedelta(rng.integers(0, 300, 120), unit="D"),
                              "country": rng.choice(["UK", "FR", "DE"], 120)})
    products = pd.DataFrame({"product_id": [f"p{i}" for i in range(30)],
                             "category": [f"cat{i % 7}" for i in range(30)], "name": [f"P {i}" for i in range(30)]})
    quantity = rng.integers(1, 5, n) * np.where(rng.random(n) < 0.15, -1, 1)
    lines = pd.DataFrame({
        "order_id": [f"o{i}" for i in rng.integers(0, 600, n)],
        "customer_id": [f"c{i}" for i in rng.integers(0, 125, n)],  # c120..c124 are unknown
        "order_ts": pd.Timestamp("2024-06-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 400, n), unit="D"),
        "product_id": [f"p{i}" for i in rng.integers(0, 30, n)],
        "quantity": quantity, "unit_price": rng.choice([1.25, 2.5, 9.99, 14.0], n),
    })
    lines = pd.concat([lines, lines.sample(80, random_state=1)], ignore_index=True)  # exact duplicates
    return customers, products, lines


def _write_clean_by_part(store: RunStore, customers, products, lines, partitions: int):
    dimensions = clean_dimensions(customers, products)
    tally: list[CleanPart] = []
    ref = store.write_partitioned("clean", "order_lines", clean_parts(
        checked_partitions(split_by_customer(lines, partitions), partitions),
        split_by_customer(dimensions.customers, partitions), dimensions.products, tally), sort_by=CLEAN_LINE_ORDER)
    return ref, clean_stats(dimensions.stats, *line_counts_of(tally))


@pytest.mark.parametrize("frames", [_frames, _random_lines])
@pytest.mark.parametrize("partitions", [1, 2, 3, 7])
def test_clean_by_partition_gives_the_single_frame_rows_and_stats(tmp_path, frames, partitions):
    customers, products, lines = frames()
    whole = clean_and_merge(customers, products, lines)
    store = RunStore(tmp_path, AS_OF)
    ref, stats = _write_clean_by_part(store, customers, products, lines, partitions)
    assert len(ref.parts) == partitions
    assert stats == whole.stats
    # Read whole, the table has the single frame's rows, values, dtypes and (no two customers tie) order.
    pd.testing.assert_frame_equal(store.read_frame(ref), whole.order_lines, check_exact=True)
    # Every customer's lines are in one part, in the single frame's order.
    seen = set()
    for part in store.read_parts(ref):
        ids = set(part["customer_id"])
        assert not ids & seen
        seen |= ids
        expected = whole.order_lines[whole.order_lines["customer_id"].isin(ids)].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, expected, check_exact=True)


def test_clean_stats_reconcile_on_the_hand_made_data():
    customers, products, lines = _frames()
    stats = clean_and_merge(customers, products, lines).stats["order_lines"]
    assert (stats["rows_in"], stats["exact_duplicates_dropped"], stats["incomplete_dropped"],
            stats["unknown_customer_dropped"], stats["unknown_product_dropped"]) == (len(lines), 1, 2, 1, 1)
    assert stats["unmatched_return_lines"] == 2  # C4 (nothing bought before) and R2 (5 back of 3 bought)


@pytest.mark.parametrize("frames", [_frames, _random_lines])
@pytest.mark.parametrize("partitions", [2, 5])
def test_features_by_partition_equal_the_single_frame_build(tmp_path, frames, partitions):
    customers, products, lines = frames()
    whole = clean_and_merge(customers, products, lines)
    store = RunStore(tmp_path, AS_OF)
    ref, _ = _write_clean_by_part(store, customers, products, lines, partitions)
    expected = build_customer_features(whole.customers, whole.order_lines, AS_OF)
    actual = features_by_part(whole.customers, store.read_parts(ref, columns=CATEGORY_VALUE_COLUMNS),
                              store.read_parts(ref), AS_OF, partitions)
    assert len(expected) > 3
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)


def test_features_by_partition_with_no_purchase_is_the_empty_table(tmp_path):
    customers, products, lines = _frames()
    whole = clean_and_merge(customers, products, lines[lines["quantity"] < 0])
    store = RunStore(tmp_path, AS_OF)
    ref, _ = _write_clean_by_part(store, customers, products, lines[lines["quantity"] < 0], 3)
    expected = build_customer_features(whole.customers, whole.order_lines, AS_OF)
    actual = features_by_part(whole.customers, store.read_parts(ref, columns=CATEGORY_VALUE_COLUMNS),
                              store.read_parts(ref), AS_OF, 3)
    assert actual.empty and list(actual.columns) == list(expected.columns)


# ---- the store's partitioned tables ------------------------------------------------------------------------
def _table(n: int = 50) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [f"c{i % 13}" for i in range(n)], "order_ts": np.arange(n) // 3,
                         "order_id": [f"o{(n - i) % 7}" for i in range(n)], "product_id": "p",
                         "amount": np.linspace(0, 1, n)})


def test_a_partitioned_table_reads_back_as_the_single_file(tmp_path):
    frame = _table().sort_values(["order_ts", "order_id"], kind="stable", ignore_index=True)
    store = RunStore(tmp_path, AS_OF)
    single = store.read_frame(store.write_frame("clean", "single", frame))
    ref = store.write_partitioned("clean", "lines", split_by_customer(frame, 4), sort_by=["order_ts", "order_id"])
    assert ref.rows == len(frame) and ref.parts == [f"part-{i:05d}.parquet" for i in range(4)]
    pd.testing.assert_frame_equal(store.read_frame(ref), single, check_exact=True)
    # What readers do with the reference: the schema and row count of the whole, filters, column subsets.
    assert pq.read_schema(ref.path).names == list(frame.columns)
    assert pq.read_metadata(ref.path).num_rows == len(frame)
    pd.testing.assert_frame_equal(store.read_frame(ref, columns=["amount"], filters=[("customer_id", "==", "c3")]),
                                  single.loc[single["customer_id"] == "c3", ["amount"]].reset_index(drop=True))
    pd.testing.assert_frame_equal(pd.read_parquet(ref.file.parent).sort_values("amount", ignore_index=True),
                                  single.sort_values("amount", ignore_index=True))
    unordered = store.read_frame(ref, ordered=False)  # part after part, each in the table's order
    pd.testing.assert_frame_equal(unordered, pd.concat(list(store.read_parts(ref)), ignore_index=True))
    pd.testing.assert_frame_equal(unordered.sort_values("amount", ignore_index=True),
                                  single.sort_values("amount", ignore_index=True))
    with pytest.raises(OSError):  # the schema file holds no rows: reading it as a table fails loudly
        pd.read_parquet(ref.path)


def test_partitioned_hashes_are_deterministic_and_cover_every_part(tmp_path):
    store = RunStore(tmp_path, AS_OF)
    first = store.write_partitioned("clean", "lines", split_by_customer(_table(), 3))
    again = store.write_partitioned("clean", "lines", split_by_customer(_table(), 3))
    assert again.content_hash == first.content_hash and again.bytes == first.bytes and is_intact(again)
    changed = _table().assign(amount=lambda f: f["amount"].where(f["customer_id"] != "c5", -1.0))
    assert store.write_partitioned("clean", "other", split_by_customer(changed, 3)).content_hash != first.content_hash
    part = again.file.parent / again.parts[1]
    part.write_bytes(part.read_bytes()[:-1] + b"X")
    assert not is_intact(again)


def test_a_failed_partitioned_write_leaves_the_previous_table_whole_and_no_temporary_folder(tmp_path):
    store = RunStore(tmp_path, AS_OF)
    before = store.write_partitioned("clean", "lines", split_by_customer(_table(), 3))

    def failing():
        yield _table(10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write_partitioned("clean", "lines", failing())
    assert is_intact(before)
    assert sorted(p.name for p in (tmp_path / "runs" / "as_of=2025-03-31" / "clean").iterdir()) == ["lines.parquet"]


def test_empty_parts_take_the_schema_of_the_others(tmp_path):
    frame = _table()
    parts = [frame.iloc[:0].astype(object), frame, frame.iloc[:0].astype(object)]
    ref = RunStore(tmp_path, AS_OF).write_partitioned("clean", "lines", iter(parts))
    assert [pq.read_metadata(p).num_rows for p in ref.part_files] == [0, len(frame), 0]
    assert {str(pq.read_schema(p).types) for p in ref.part_files} == {str(pq.read_schema(ref.path).types)}


def test_a_later_run_finds_a_partitioned_table_through_the_manifest_and_by_its_layout(tmp_path):
    store = RunStore(tmp_path, AS_OF)
    ref = store.write_partitioned("clean", "order_lines", split_by_customer(_table(), 2), sort_by=["order_ts"])
    store.write_manifest({"artifacts": {"clean/order_lines": ref.manifest_entry(store.relative(ref))}})
    assert store.artifact("clean", "order_lines") == ref.model_copy(update={"stage": "clean"})
    store.write_manifest({"artifacts": {}})
    by_layout = store.artifact("clean", "order_lines")
    assert by_layout == ref.model_copy(update={"stage": "clean"})
    assert store.recorded_stage("clean", "k") is None
    store.record_stage("clean", "k", StageResult(stage="clean", artifacts={"order_lines": ref}))
    assert store.recorded_stage("clean", "k").ref("order_lines") == ref


def test_the_customer_hash_is_stable_and_keeps_a_customer_in_one_part():
    ids = pd.Series(["c1", "c2", None, "c1", "zz"], dtype=object)
    parts = customer_partition(ids, 4)
    assert parts[0] == parts[3] and parts[2] == 0 and ((parts >= 0) & (parts < 4)).all()
    assert (customer_partition(ids.astype("string"), 4) == parts).all()  # the same for Arrow-backed strings
    # Pinned values: the partitions of stored artifacts must not move between versions or processes.
    assert customer_partition(pd.Series(["c1", "c2", "zz", "C000123"]), 7).tolist() == [2, 0, 2, 4]


def test_a_part_holding_another_partitions_customers_is_refused():
    customers, products, lines = _frames()
    parts = list(split_by_customer(lines, 3))
    with pytest.raises(PartitionMismatchError, match="part 0 of 3"):
        list(checked_partitions([parts[1], parts[0], parts[2]], 3))
    assert sum(len(p) for p in checked_partitions(parts, 3)) == len(lines)


# ---- the stage edges: validate writes the parts, clean and features process them ----------------------------
def _stages_through_features(root, monkeypatch, lines_per_partition: int) -> dict[str, StageResult]:
    from crm_analytics.parameters import PipelineOptions, RunSpec
    from crm_analytics.settings import get_settings
    from tasks.clean import clean
    from tasks.features import features
    from tasks.ingest import ingest
    from tasks.validate import validate

    monkeypatch.setenv("CRM_LINES_PER_PARTITION", str(lines_per_partition))
    monkeypatch.setenv("CRM_PSEUDONYM_KEY", "partitions-equality-test")
    get_settings.cache_clear()
    try:
        options = PipelineOptions(data_root=str(root))
        run = RunSpec(data_root=root, as_of=EDGE_AS_OF)
        validated = validate.fn(run, ingest.fn(run, options.mapping, None), options.validation, options.mapping)
        cleaned = clean.fn(run, validated)
        return {"validate": validated, "clean": cleaned, "features": features.fn(run, cleaned)}
    finally:
        monkeypatch.delenv("CRM_LINES_PER_PARTITION")
        get_settings.cache_clear()


EDGE_AS_OF = date(2025, 12, 31)


def test_the_stage_edges_give_the_same_tables_and_metrics_in_one_part_or_many(tmp_path, monkeypatch):
    from crm_analytics.sample_data import GeneratorConfig, generate

    export = tmp_path / "export"
    generate(GeneratorConfig(customers=400, seed=21), export)
    results = {}
    for parts in (1, 700):  # one part, and ~6 parts of ~700 lines
        root = tmp_path / f"lines-{parts}"
        root.mkdir()
        (root / "landing").symlink_to(export / "landing")
        results[parts] = _stages_through_features(root, monkeypatch, 10**9 if parts == 1 else parts)
    whole, split = results[1], results[700]
    assert len(whole["validate"].ref("order_lines").parts) == 1
    assert len(split["validate"].ref("order_lines").parts) > 3
    assert len(split["clean"].ref("order_lines").parts) == len(split["validate"].ref("order_lines").parts)
    for stage, name in (("clean", "order_lines"), ("clean", "customers"), ("features", "customer_features")):
        expected = RunStore.read_frame(whole[stage].ref(name))
        assert len(expected) > 100
        pd.testing.assert_frame_equal(RunStore.read_frame(split[stage].ref(name)), expected, check_exact=True,
                                      obj=f"{stage}/{name}")
    strip = ("timing", "executor")
    assert ({k: v for k, v in split["clean"].metrics.items() if k not in strip}
            == {k: v for k, v in whole["clean"].metrics.items() if k not in strip})
    assert split["clean"].metrics["executor"] == {"kind": "local"}


def test_the_arrow_split_writes_the_same_parts_as_the_pandas_split(tmp_path):
    from crm_analytics.partitions import split_table_by_customer

    customers, products, lines = _random_lines()
    store = RunStore(tmp_path, AS_OF)
    by_frames = store.write_partitioned("validated", "a", split_by_customer(lines, 4))
    by_tables = store.write_partitioned("validated", "b", split_table_by_customer(lines, 4))
    assert by_tables.content_hash == by_frames.content_hash and by_tables.rows == len(lines)
