import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.metrics import adjusted_rand_score

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec, SegmentOptions
from tasks.features import build_customer_features, quantile_score
from tasks.segment import (
    choose_clusters,
    fit_segments,
    lifecycle,
    match_segments,
    migration_matrix,
    name_segment,
    read_previous,
    segment,
)
from tests.segment_support import generated_features, previous_of

# Behaviour of three planted kinds: usual gap (days), lines per order, typical unit price, return rate,
# order value. All have 8-40 orders, enough to be clustered under the default min_orders of 8.
KINDS = {
    "vip": (20, 4.5, 15.0, 0.02, 150.0),
    "bargain": (45, 2.0, 3.0, 0.20, 20.0),
    "slow": (75, 3.0, 9.0, 0.04, 60.0),
}


def _planted(seed=0, n=80, kinds=KINDS, prefix="c"):
    rng = np.random.default_rng(seed)
    frames = []
    for name, (gap, basket, price, returns, value) in kinds.items():
        def noise(v):
            return v * rng.lognormal(0, 0.08, n)
        orders = rng.integers(8, 40, n)
        frames.append(pd.DataFrame({
            "truth": name, "frequency_orders": orders, "mean_interpurchase_days": noise(gap),
            "avg_basket_size": noise(basket), "typical_unit_price": noise(price),
            "return_rate": (returns + rng.normal(0, 0.005, n)).clip(0), "avg_order_value": noise(value),
            "monetary_total": noise(value) * orders, "recency_days": rng.uniform(1, 400, n),
            "tenure_days": rng.uniform(400, 800, n), "first_purchase_days": rng.uniform(300, 700, n),
        }))
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "customer_id", [f"{prefix}{i:04d}" for i in range(len(frame))])
    return _scored(frame)


def _scored(frame):
    frame = frame.copy()
    frame["r_score"] = quantile_score(frame["recency_days"], higher_is_better=False)
    frame["f_score"] = quantile_score(frame["frequency_orders"])
    frame["m_score"] = quantile_score(frame["monetary_total"])
    frame["rfm_score"] = frame[["r_score", "f_score", "m_score"]].sum(axis=1)
    return frame


def _with_light_buyers(features, n=30):
    light = features.head(2 * n).copy()
    light["customer_id"] = [f"l{i:04d}" for i in range(2 * n)]
    light["frequency_orders"] = [1] * n + [3] * n
    light["truth"] = ["one-time"] * n + ["light"] * n
    light.loc[light["frequency_orders"] == 1, "mean_interpurchase_days"] = np.nan
    return _scored(pd.concat([features, light], ignore_index=True))


def test_planted_kinds_are_recovered_and_named_from_their_profiles():
    features = _with_light_buyers(_planted())
    out = fit_segments(features, SegmentOptions(k_min=2, k_max=6), seed=1)
    merged = features.merge(out.assignments, on="customer_id", validate="one_to_one")
    clustered = merged[merged["segment_kind"] == "cluster"]
    assert len(clustered) == 240 and adjusted_rand_score(clustered["truth"], clustered["segment_id"]) == 1.0
    assert out.silhouette.loc[out.silhouette["chosen"], "k"].item() == 3
    name_of = merged.groupby("truth")["segment_name"].agg(lambda s: s.unique().tolist())
    assert name_of["vip"] == ["champions"]
    assert name_of["bargain"] == ["bargain hunters"]
    assert name_of["slow"] == ["infrequent buyers"]
    assert name_of["one-time"] == ["one-time buyers"] and name_of["light"] == ["light buyers"]
    # First run: clusters numbered by value (0 = most valuable), then the rule-based groups.
    assert out.profiles["segment_name"].tolist() == ["champions", "infrequent buyers", "bargain hunters",
                                                     "light buyers", "one-time buyers"]
    assert out.profiles["segment_id"].tolist() == [0, 1, 2, 3, 4]
    assert out.profiles["share"].sum() == pytest.approx(1.0)
    assert out.identity["stability"] is None and out.migration.empty


def test_segments_are_deterministic_for_a_seed():
    features = _planted(seed=3)
    a = fit_segments(features, SegmentOptions(k_min=2, k_max=5), seed=5)
    b = fit_segments(features.sample(frac=1.0, random_state=2), SegmentOptions(k_min=2, k_max=5), seed=5)
    pd.testing.assert_frame_equal(a.assignments, b.assignments.sort_values("customer_id", ignore_index=True))


def test_identity_follows_the_centres_not_the_cluster_numbers():
    options = SegmentOptions(k_min=2, k_max=6)
    first = fit_segments(_planted(seed=0), options, seed=1)
    ids = first.profiles.set_index("segment_name")["segment_id"]
    # The next night: the slow buyers became the most valuable (so value order would renumber them), a new
    # kind appeared, and the customers are new draws of the same kinds.
    tonight_kinds = {**KINDS, "slow": (75, 3.0, 9.0, 0.04, 900.0), "bulk": (200, 9.0, 40.0, 0.0, 500.0)}
    second = fit_segments(_planted(seed=9, kinds=tonight_kinds), options, seed=1, previous=previous_of(first))
    now = second.profiles.set_index("segment_name")["segment_id"]
    for name in ("champions", "bargain hunters", "infrequent buyers"):
        assert now[name] == ids[name], name
    new = second.identity["new_segments"]
    assert len(new) == 1 and new[0]["segment_id"] == first.identity["next_segment_id"]  # never reuses an id
    assert second.identity["retired_segments"] == []


def test_same_customers_same_behaviour_gives_identical_ids_and_a_diagonal_migration():
    options = SegmentOptions(k_min=2, k_max=6)
    features = _with_light_buyers(_planted(seed=4))
    first = fit_segments(features, options, seed=1)
    a_day_later = features.assign(recency_days=features["recency_days"] + 1, tenure_days=features["tenure_days"] + 1)
    second = fit_segments(_scored(a_day_later), options, seed=1, previous=previous_of(first))
    pd.testing.assert_series_equal(first.assignments["segment_id"], second.assignments["segment_id"])
    assert second.identity["stability"] == 1.0
    assert (second.migration["from_segment_id"] == second.migration["to_segment_id"]).all()
    assert second.migration["customers"].sum() == len(features)


def test_changed_features_start_afresh_with_new_ids_and_keep_rule_group_ids():
    features = _with_light_buyers(_planted())
    first = fit_segments(features, SegmentOptions(k_min=2, k_max=6), seed=1)
    other = SegmentOptions(k_min=2, k_max=6, features=["mean_interpurchase_days", "avg_basket_size"])
    second = fit_segments(features, other, seed=1, previous=previous_of(first))
    assert not second.identity["comparable_with_previous"]
    clusters = second.profiles[second.profiles["segment_kind"] == "cluster"]
    assert clusters["segment_id"].min() == first.identity["next_segment_id"]
    rules = second.profiles[second.profiles["segment_kind"] == "rule"].set_index("segment_name")["segment_id"]
    assert rules.to_dict() == {"light buyers": 3, "one-time buyers": 4}


@pytest.mark.parametrize(("z", "name"), [
    ({"rate": 0.8, "value": 0.9, "price": 0.9, "returns": -0.5}, "champions"),
    ({"rate": 0.8, "value": 0.2, "price": -0.9, "returns": 0.0}, "bargain hunters"),
    ({"rate": -0.2, "value": -0.2, "price": 0.0, "returns": 1.0}, "bargain hunters"),
    ({"rate": 0.8, "value": 0.2, "price": 0.0, "returns": 0.0}, "loyal"),
    ({"rate": -0.8, "value": 0.7, "price": 0.0, "returns": 0.0}, "big spenders"),
    ({"rate": -1.2, "value": 0.0, "price": 0.0, "returns": 0.0}, "infrequent buyers"),
    ({"rate": -0.85, "value": 0.03, "price": 0.15, "returns": -0.2}, "regulars"),
])
def test_names_come_from_the_profile(z, name):
    assert name_segment(pd.Series(z)) == name


def test_match_segments_is_optimal_and_leaves_far_centres_unmatched():
    previous = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    tonight = np.array([[0.0, 4.6], [4.8, 0.3], [20.0, 20.0], [0.2, -0.1]])
    assert sorted(match_segments(tonight, previous, max_distance=1.0)) == [
        (0, 2, pytest.approx(0.4)), (1, 1, pytest.approx(np.hypot(0.2, 0.3))),
        (3, 0, pytest.approx(np.hypot(0.2, 0.1)))]  # the far centre (20, 20) is a new segment


def test_migration_matrix_counts_moves_and_arrivals():
    previous = pd.DataFrame({"customer_id": ["a", "b", "c", "d"], "segment_id": [0, 0, 1, 1],
                             "segment_name": ["x", "x", "y", "y"]})
    current = pd.DataFrame({"customer_id": ["a", "b", "c", "e"], "segment_id": [0, 1, 1, 1],
                            "segment_name": ["x", "y", "y", "y"]})
    matrix, stability = migration_matrix(previous, current)
    counts = {(r.from_segment_id, r.to_segment_id): r.customers for r in matrix.itertuples()}
    assert counts == {(0, 0): 1, (0, 1): 1, (1, 1): 1, (1, -1): 1, (-1, 1): 1}
    assert stability == pytest.approx(2 / 3)  # a and c stayed, b moved; d left and e arrived are not counted


def test_previous_k_is_kept_unless_another_is_clearly_better():
    z = _planted(seed=2)[["mean_interpurchase_days", "avg_basket_size"]].to_numpy()
    z = (np.log(z) - np.log(z).mean(axis=0)) / np.log(z).std(axis=0)
    options = SegmentOptions(k_min=2, k_max=5, k_switch_margin=0.02)
    _, free = choose_clusters(z, options, seed=0, previous_k=None)
    best = free.loc[free["chosen"], "k"].item()
    runner_up = free[~free["chosen"]].sort_values("silhouette").iloc[-1]
    _, sticky = choose_clusters(z, options.model_copy(update={"k_switch_margin": 1.0}), 0, int(runner_up["k"]))
    assert sticky.loc[sticky["chosen"], "k"].item() == runner_up["k"] != best
    _, strict = choose_clusters(z, options.model_copy(update={"k_switch_margin": 0.0}), 0, int(runner_up["k"]))
    assert strict.loc[strict["chosen"], "k"].item() == best


def test_lifecycle_states():
    features = pd.DataFrame({"recency_days": [5.0, 50.0, 100.0, 500.0, 10.0],
                             "mean_interpurchase_days": [30.0, 30.0, 30.0, 30.0, np.nan],
                             "first_purchase_days": [400.0, 400.0, 400.0, 600.0, 20.0]})
    assert lifecycle(features, new_customer_days=90).tolist() == ["active", "active", "at risk", "hibernating", "new"]


@pytest.mark.parametrize("method", ["agglomerative", "dbscan"])
def test_agglomerative_and_dbscan_are_selectable(method):
    features = _planted(seed=5)
    far = features.tail(1).assign(customer_id="odd", mean_interpurchase_days=3000.0, avg_basket_size=40.0)
    features = _scored(pd.concat([features, far], ignore_index=True))
    options = SegmentOptions(method=method, k_min=2, k_max=6, dbscan_eps=0.8, dbscan_min_samples=5)
    out = fit_segments(features, options, seed=1)
    merged = features.merge(out.assignments, on="customer_id")
    planted = merged[merged["customer_id"] != "odd"]
    assert adjusted_rand_score(planted["truth"], planted["segment_id"]) == 1.0
    if method == "dbscan":
        assert merged.set_index("customer_id").loc["odd", "segment_name"] == "outliers"


def test_too_few_customers_to_cluster_are_grouped_by_rule():
    features = _planted(n=5)
    out = fit_segments(features, SegmentOptions(), seed=1)
    assert out.identity["k"] == 0 and out.model is None
    assert set(out.assignments["segment_name"]) == {"repeat buyers"}


def test_the_saved_model_assigns_the_same_segments(tmp_path):
    options = SegmentOptions(k_min=2, k_max=6)
    features = _planted(seed=6)
    out = fit_segments(features, options, seed=1)
    path = tmp_path / "model.skops"
    sio.dump(out.model, path)
    model = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    predicted = model.predict(features[options.features].to_numpy())
    np.testing.assert_array_equal(predicted, out.assignments["segment_id"].to_numpy())


# ---- the task edge on generated data: two consecutive days, read back from the previous run's folder ----
def test_two_consecutive_nights_on_the_same_data_keep_ids_and_read_the_previous_run(sample_root, tmp_path):
    day1 = date(2025, 12, 30)
    cleaned, features1 = generated_features(sample_root, day1)
    features2 = build_customer_features(cleaned.customers, cleaned.order_lines, day1 + timedelta(days=1))
    results = {}
    for as_of, table in ((day1, features1), (day1 + timedelta(days=1), features2)):
        run = RunSpec(data_root=tmp_path, as_of=as_of)
        ref = run.store.write_frame("features", "customer_features", table)
        results[as_of] = segment.fn(run, StageResult(stage="features", artifacts={"customer_features": ref}),
                                    SegmentOptions(), 42)
        run.store.write_manifest({"as_of": as_of.isoformat()})  # the run is complete: tomorrow may read it
    first, second = results[day1], results[day1 + timedelta(days=1)]
    assert 3 <= first.metrics["k"] <= 8 and first.metrics["stability"] is None
    assert second.metrics["stability"] == 1.0 and second.metrics["new_segments"] == 0
    a1 = pd.read_parquet(first.ref("assignments").file)
    a2 = pd.read_parquet(second.ref("assignments").file)
    pd.testing.assert_frame_equal(a1[["customer_id", "segment_id", "segment_name"]],
                                  a2[["customer_id", "segment_id", "segment_name"]])
    migration = pd.read_parquet(second.ref("migration").file)
    assert (migration["from_segment_id"] == migration["to_segment_id"]).all()
    identity = json.loads(second.ref("identity").file.read_text())
    assert identity["previous_as_of"] == day1.isoformat() and len(identity["matched"]) == first.metrics["k"]
    for name in ("sizes", "projection", "silhouette"):
        assert second.ref(f"figure_{name}").file.stat().st_size > 1000
    assert "Stability" in second.report_section and "Migration" in second.report_section


def test_a_previous_run_without_centroids_gives_fresh_ids_without_crashing(tmp_path):
    old = RunSpec(data_root=tmp_path, as_of=date(2025, 1, 1)).store  # e.g. written before segments had identity
    features = _planted(seed=8)
    old.write_frame("segments", "assignments", features[["customer_id"]].assign(segment_id=0, segment_name="x"))
    old.write_frame("segments", "profiles", pd.DataFrame({"segment_id": [0, 1, 2], "segment_name": ["x", "y", "z"]}))
    old.write_manifest({})
    previous = read_previous(RunSpec(data_root=tmp_path, as_of=date(2025, 1, 2)).store)
    out = fit_segments(features, SegmentOptions(k_min=2, k_max=6), seed=1, previous=previous)
    assert not out.identity["comparable_with_previous"] and out.identity["previous_as_of"] == "2025-01-01"
    assert out.profiles["segment_id"].min() == 3  # never reuses an id the old run gave out
    assert out.identity["stability"] == 0.0


def test_low_stability_is_warned_about(tmp_path, caplog):
    features = _planted(seed=3)
    shuffled = features.assign(customer_id=features["customer_id"].sample(frac=1.0, random_state=0).to_numpy())
    options = SegmentOptions(k_min=2, k_max=6)
    for as_of, table in ((date(2025, 3, 1), features), (date(2025, 3, 2), shuffled.sort_values("customer_id"))):
        run = RunSpec(data_root=tmp_path, as_of=as_of)
        ref = run.store.write_frame("features", "customer_features", table)
        with caplog.at_level("WARNING", logger="crm_analytics"):
            result = segment.fn(run, StageResult(stage="features", artifacts={"customer_features": ref}), options, 1)
        run.store.write_manifest({})
    assert result.metrics["stability"] < 0.5  # customers swapped behaviour: most changed segment
    assert any("segment stability" in r.getMessage() and "below 80%" in r.getMessage() for r in caplog.records)
