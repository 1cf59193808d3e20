"""The Dask executor: the partitioned stages write the local path's artifacts, and a real multi-process cluster
runs a backfill and a partitioned run."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.parameters import PipelineOptions, RunSpec
from crm_analytics.sample_data import GeneratorConfig, generate
from crm_analytics.settings import get_settings

pytest.importorskip("prefect_dask", reason="the dask extra is not installed")

AS_OF = date(2025, 12, 31)
# Sort keys that make row order irrelevant: the contract is the same rows with the same values.
KEYS = {
    "raw": ["_source_file", "_source_line"],
    "clean/customers": ["customer_id"],
    "clean/products": ["product_id"],
    "clean/order_lines": ["order_ts", "order_id", "product_id", "customer_id", "quantity", "unit_price",
                          "returned_quantity", "netted_quantity"],
    "features": ["customer_id"],
}


def _use_executor(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(f"CRM_{name.upper()}", value)
    get_settings.cache_clear()


def _stages_through_features(root: Path) -> dict[str, object]:
    """ingest -> validate -> clean -> features, the stage edges called directly (as in a notebook)."""
    from tasks.clean import clean
    from tasks.features import features
    from tasks.ingest import ingest
    from tasks.validate import validate

    options = PipelineOptions(data_root=str(root))
    run = RunSpec(data_root=root, as_of=AS_OF)
    ingested = ingest.fn(run, options.mapping, None)
    validated = validate.fn(run, ingested, options.validation, options.mapping)
    cleaned = clean.fn(run, validated)
    featured = features.fn(run, cleaned)
    return {"ingest": ingested, "clean": cleaned, "features": featured}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dask-export")
    generate(GeneratorConfig(customers=600, seed=13), root)
    return root


def _fresh_root(export: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "landing").symlink_to(export / "landing")
    return root


def test_partitioned_stages_write_the_local_artifacts(export, tmp_path, monkeypatch):
    from crm_analytics.distributed import close_shared_clients

    local_root, dask_root = _fresh_root(export, tmp_path, "local"), _fresh_root(export, tmp_path, "dask")
    # One pseudonym key for both roots (each would otherwise make its own), so pseudonyms can be compared.
    _use_executor(monkeypatch, executor="local", pseudonym_key="dask-equality-test")
    local = _stages_through_features(local_root)
    # Three partitions on two workers: more partitions than workers, and an odd count, as on a real cluster.
    _use_executor(monkeypatch, executor="dask", dask_workers="2", dask_partitions="3")
    try:
        on_dask = _stages_through_features(dask_root)
    finally:
        close_shared_clients()
        monkeypatch.undo()
        get_settings.cache_clear()

    compared = 0
    for stage in ("ingest", "clean", "features"):
        mine, theirs = local[stage], on_dask[stage]
        assert sorted(mine.artifacts) == sorted(theirs.artifacts), stage
        for name, ref in mine.artifacts.items():
            if ref.kind != "parquet":
                continue
            other = theirs.artifacts[name]
            key = KEYS.get(f"{stage}/{name}") or KEYS.get("raw" if stage == "ingest" else stage)
            expected = pd.read_parquet(ref.file).sort_values(key, ignore_index=True)
            actual = pd.read_parquet(other.file).sort_values(key, ignore_index=True)
            assert len(expected) > 0, f"{stage}/{name} is empty: the comparison would prove nothing"
            pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=1e-9,
                                          obj=f"{stage}/{name}")
            assert other.schema_fingerprint == ref.schema_fingerprint, f"{stage}/{name}"
            compared += 1
    assert compared == 3 + 3 + 1  # raw customers, products, order_lines; clean x3; features
    for stage in ("ingest", "clean", "features"):
        assert local[stage].metrics["executor"] == {"kind": "local"}, stage
        assert on_dask[stage].metrics["executor"]["kind"] == "dask", stage
        assert on_dask[stage].metrics["executor"]["partitions"] == 3, stage
    strip = ("timing", "reused", "executor")
    for stage in ("clean", "features"):
        assert ({k: v for k, v in on_dask[stage].metrics.items() if k not in strip}
                == {k: v for k, v in local[stage].metrics.items() if k not in strip}), stage
