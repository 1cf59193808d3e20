import os
from datetime import date
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest

from crm_analytics.artifacts import RunStore, atomic_path, file_sha256

REPO = Path(__file__).resolve().parent.parent


def test_write_frame_returns_a_reference_that_describes_the_file(tmp_path):
    store = RunStore(tmp_path, date(2025, 1, 31))
    ref = store.write_frame("clean", "customers", pd.DataFrame({"customer_id": ["a", "b", "c"], "x": [1, 2, 3]}))
    assert ref.file == tmp_path / "runs" / "as_of=2025-01-31" / "clean" / "customers.parquet"
    assert ref.rows == 3
    assert ref.content_hash == file_sha256(ref.file)
    assert ref.bytes == ref.file.stat().st_size
    assert store.read_frame(ref)["x"].tolist() == [1, 2, 3]


def test_schema_fingerprint_changes_with_column_types_but_not_values(tmp_path):
    store = RunStore(tmp_path, date(2025, 1, 31))
    a = store.write_frame("clean", "a", pd.DataFrame({"x": [1, 2]}))
    b = store.write_frame("clean", "b", pd.DataFrame({"x": [5, 6]}))
    c = store.write_frame("clean", "c", pd.DataFrame({"x": [1.0, 2.0]}))
    assert a.schema_fingerprint == b.schema_fingerprint
    assert a.schema_fingerprint != c.schema_fingerprint
    assert a.content_hash != b.content_hash


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary_file(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("writer crashed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_rerun_withdraws_the_manifest_until_it_completes(tmp_path):
    store = RunStore(tmp_path, date(2025, 1, 31))
    store.write_manifest({"as_of": "2025-01-31"})
    assert store.is_complete()
    store.begin()
    assert not store.is_complete()


def test_unknown_stage_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        RunStore(tmp_path, date(2025, 1, 31)).path("scratch", "x.parquet")


def test_previous_complete_run_skips_incomplete_and_later_runs(tmp_path):
    for day, complete in ((date(2025, 1, 1), True), (date(2025, 1, 5), True), (date(2025, 1, 7), False),
                          (date(2025, 1, 20), True)):
        store = RunStore(tmp_path, day)
        store.begin()
        if complete:
            store.write_manifest({"as_of": day.isoformat()})
    assert RunStore(tmp_path, date(2025, 1, 10)).previous_complete().as_of == date(2025, 1, 5)
    assert RunStore(tmp_path, date(2025, 1, 1)).previous_complete() is None


def test_an_earlier_run_is_read_through_its_manifest_not_its_layout(tmp_path):
    earlier = RunStore(tmp_path, date(2025, 1, 5))
    earlier.begin()
    ref = earlier.write_frame("segments", "centroids", pd.DataFrame({"segment": [1, 2]}))
    assert earlier.artifact("segments", "centroids") is None  # not complete yet: nothing to read
    earlier.write_manifest({"idempotency_key": "k1", "artifacts": {"segments/centroids": {
        "path": earlier.relative(ref), "kind": ref.kind, "rows": ref.rows,
        "schema_fingerprint": ref.schema_fingerprint, "content_hash": ref.content_hash, "bytes": ref.bytes}}})
    later = RunStore(tmp_path, date(2025, 1, 6))
    found = later.previous_complete().artifact("segments", "centroids")
    assert found == ref and RunStore.read_frame(found)["segment"].tolist() == [1, 2]
    assert later.previous_complete().artifact("segments", "profiles") is None
    assert RunStore.latest_complete(tmp_path).as_of == date(2025, 1, 5) and earlier.completed_key() == "k1"
    assert later.completed_key() is None and RunStore.complete_dates(tmp_path) == [date(2025, 1, 5)]


def test_the_time_inside_stages_counts_overlapping_stages_once():
    import importlib.util

    from tasks.common import measured

    with measured() as timing:
        pass
    assert set(timing) == {"started_at", "wall_seconds", "cpu_seconds", "peak_rss_mb"}
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # the script sets Prefect's log level for itself: not for later tests
        spec.loader.exec_module(bench)
    stages = {"ingest": (0.0, 10.0), "features": (10.0, 5.0), "rules": (11.0, 6.0), "churn": (20.0, 4.0),
              "report": (None, 1.0)}  # rules beside features (10-17 covered once), a gap 17-20, a stage untimed
    manifest = {"stages": {name: {"timing": {"wall_seconds": wall} | ({} if start is None else {"started_at": start})}
                           for name, (start, wall) in stages.items()}}
    assert bench.stage_wall_seconds(manifest) == 10.0 + 7.0 + 4.0
