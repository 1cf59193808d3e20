import json
from datetime import date

import pandas as pd
import pytest

from crm_analytics.artifacts import file_sha256
from crm_analytics.sample_data import GeneratorConfig, generate, true_churn_probability


def _hashes(root):
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted((root / "landing").rglob("*.csv"))}


def test_same_seed_same_export_and_another_seed_differs(tmp_path):
    generate(GeneratorConfig(customers=300, seed=1, history_days=120), tmp_path / "a")
    generate(GeneratorConfig(customers=300, seed=1, history_days=120), tmp_path / "b")
    generate(GeneratorConfig(customers=300, seed=2, history_days=120), tmp_path / "c")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "c")


def test_export_has_daily_files_types_returns_and_every_kind_of_dirty_row(sample_root):
    counts = json.loads((sample_root / "truth" / "generator.json").read_text())["counts"]
    files = sorted((sample_root / "landing" / "order_lines").glob("*.csv"))
    assert len(files) == counts["order_line_files"] and files[-1].stem == "2025-12-31"
    truth = pd.read_parquet(sample_root / "truth" / "customers.parquet")
    assert set(truth["customer_type"]) == {"vip", "regular", "bargain_hunter", "occasional"}
    dirty = pd.read_parquet(sample_root / "truth" / "dirty_order_lines.parquet")
    assert set(dirty["kind"]) == {"null_customer", "null_price", "bad_quantity", "bad_timestamp",
                                  "negative_price", "future_timestamp", "unknown_customer", "duplicate"}
    lines = pd.concat(pd.read_csv(f, dtype=str) for f in files)
    assert lines["order_id"].str.startswith("R").any()            # returns exist
    assert (pd.to_numeric(lines["quantity"], errors="coerce") < 0).any()


def test_seasonality_and_weekly_cycle_are_visible(sample_root):
    files = sorted((sample_root / "landing" / "order_lines").glob("*.csv"))
    per_day = pd.Series({pd.Timestamp(f.stem): sum(1 for _ in f.open()) - 1 for f in files})
    december = per_day[per_day.index.month == 12].mean()
    spring = per_day[per_day.index.month.isin([3, 4])].mean()
    assert december > 1.3 * spring


def test_true_churn_probability_is_a_probability_and_ranks_stopped_customers_higher(sample_root):
    truth = pd.read_parquet(sample_root / "truth" / "customers.parquet")
    lines = pd.concat(pd.read_csv(f, dtype=str) for f in (sample_root / "landing" / "order_lines").glob("*.csv"))
    lines["order_ts"] = pd.to_datetime(lines["order_ts"], errors="coerce")
    cutoff = pd.Timestamp(date(2025, 9, 30))
    known = lines[lines["customer_id"].isin(truth["customer_id"]) & (lines["order_ts"] < cutoff)]
    last = known.groupby("customer_id")["order_ts"].max()
    p = true_churn_probability(truth, last, cutoff, 90)
    assert p.between(0, 1).all()
    stopped = truth.set_index("customer_id").loc[last.index, "churn_ts"] < cutoff
    assert p[stopped.to_numpy()].mean() > p[~stopped.to_numpy()].mean() + 0.2


def test_generator_rejects_nothing_silently_on_tiny_scale(tmp_path):
    counts = generate(GeneratorConfig(customers=100, seed=3, dirty_rate=0.0), tmp_path)
    assert counts["dirty_order_lines"] == 0 and counts["customers"] == 100


@pytest.mark.parametrize("customers,products", [(1_000, 150), (100_000, 2000), (1_000_000, 2000)])
def test_catalogue_scales_with_customers(customers, products):
    assert GeneratorConfig(customers=customers).products == products
