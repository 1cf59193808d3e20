"""Segments against the generator's planted customer types (slow: a 20,000-customer export).

Which customers can be held to the truth: a type is a rate and a set of preferences, visible only through
enough orders. With one or two orders every type looks alike (even a classifier trained on the truth cannot
tell them apart; ``benchmarks/bench_features.py --identifiability`` prints the numbers), so the segment stage
clusters only customers with at least ``min_orders`` orders and this test holds exactly those to ARI >= 0.8.
Which features: behaviour while active (usual gap between orders, lines per order, typical unit price, return
rate), not recency or tenure, so customers who stopped buying long ago are still recognised by how they
bought; the test checks that separately for the lapsed ones.
"""

from datetime import timedelta

import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from crm_analytics.parameters import SegmentOptions
from crm_analytics.sample_data import GeneratorConfig, generate
from tasks.features import build_customer_features
from tasks.segment import fit_segments
from tests.segment_support import generated_features, previous_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-types")
    config = GeneratorConfig(customers=20_000, seed=11)
    generate(config, root)
    cleaned, features = generated_features(root, config.end_date)
    truth = pd.read_parquet(root / "truth" / "customers.parquet").set_index("customer_id")["customer_type"]
    return config, cleaned, features, truth


def test_segments_recover_the_planted_types_of_customers_with_enough_orders(planted):
    _, _, features, truth = planted
    out = fit_segments(features, SegmentOptions(), seed=42)
    clustered = out.assignments[out.assignments["segment_kind"] == "cluster"]
    types = truth.reindex(clustered["customer_id"]).to_numpy()
    assert len(clustered) >= 1500
    assert adjusted_rand_score(types, clustered["segment_id"]) >= 0.8
    # Customers who stopped buying half a year ago or more are recognised by how they bought, too.
    lapsed = clustered["customer_id"].isin(features.loc[features["recency_days"] > 180, "customer_id"]).to_numpy()
    assert lapsed.sum() >= 100
    assert adjusted_rand_score(types[lapsed], clustered["segment_id"].to_numpy()[lapsed]) >= 0.8
    # The most valuable kind is found and named from its profile.
    vip = clustered[types == "vip"]["segment_name"].value_counts(normalize=True)
    assert vip.index[0] == "champions" and vip.iloc[0] >= 0.9


def _majority_type(out, truth):
    clustered = out.assignments[out.assignments["segment_kind"] == "cluster"]
    types = truth.reindex(clustered["customer_id"]).to_numpy()
    return clustered.assign(type=types).groupby("segment_id")["type"].agg(lambda s: s.mode().iloc[0])


def test_a_month_later_the_segments_keep_their_ids_and_meaning(planted):
    config, cleaned, features, truth = planted
    earlier = config.end_date - timedelta(days=30)
    past = cleaned.order_lines[cleaned.order_lines["order_ts"] < pd.Timestamp(earlier + timedelta(days=1), tz="UTC")]
    before = fit_segments(build_customer_features(cleaned.customers, past, earlier), SegmentOptions(), seed=42)
    after = fit_segments(features, SegmentOptions(), seed=42, previous=previous_of(before, earlier))
    assert len(after.identity["matched"]) == before.identity["k"] == after.identity["k"]
    assert after.identity["stability"] >= 0.9  # a month of new orders moves few customers
    pd.testing.assert_series_equal(_majority_type(before, truth), _majority_type(after, truth))
