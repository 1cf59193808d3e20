"""Segment: cluster customers on log-scaled RFM-style features, pick k by silhouette, profile and name them.

Segment ids are ordered by mean monetary value (0 = most valuable) and names are derived from each
segment's profile (its mean R, F and M scores and tenure), never hard-coded to cluster numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import skops.io as sio
from prefect import task
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec, SegmentOptions
from crm_analytics.reporting import markdown_table, save_figure
from tasks.common import stage_logger

LOG_FEATURES = ["recency_days", "frequency_orders", "monetary_total", "avg_order_value", "tenure_days"]
LINEAR_FEATURES = ["return_rate"]
SEGMENT_FEATURES = LOG_FEATURES + LINEAR_FEATURES
PROFILE_COLUMNS = SEGMENT_FEATURES + ["r_score", "f_score", "m_score", "rfm_score"]
NEW_CUSTOMER_TENURE_DAYS = 120


class SegmentOutput(NamedTuple):
    assignments: pd.DataFrame
    profiles: pd.DataFrame
    silhouette: pd.DataFrame
    model: Pipeline


def _log_transform(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype="float64", copy=True)
    x[:, : len(LOG_FEATURES)] = np.log1p(np.clip(x[:, : len(LOG_FEATURES)], 0, None))
    return x


def segment_pipeline(k: int, seed: int) -> Pipeline:
    return Pipeline([
        ("log", FunctionTransformer(_log_transform)),
        ("scale", StandardScaler()),
        ("kmeans", KMeans(n_clusters=k, n_init=10, random_state=seed)),
    ])


def name_segment(profile: pd.Series, population_median_tenure: float) -> str:
    """A human-readable name from a segment's mean R/F/M scores (1-5) and median tenure."""
    r, f, m = profile["r_score"], profile["f_score"], profile["m_score"]
    if r >= 3.5 and f >= 3.5 and m >= 3.5:
        return "champions"
    if profile["tenure_days"] < min(NEW_CUSTOMER_TENURE_DAYS, population_median_tenure) and f < 3:
        return "new customers"
    if f >= 3.5 and r >= 2.5:
        return "loyal"
    if r < 2.5 and (f >= 3.5 or m >= 3.5):
        return "at risk"
    if r < 2.5:
        return "hibernating"
    if r >= 3 and f < 3:
        return "promising"
    return "needs attention"


def fit_segments(features: pd.DataFrame, options: SegmentOptions, seed: int) -> SegmentOutput:
    x = features[SEGMENT_FEATURES].fillna(0.0).to_numpy()
    if len(x) < options.k_min + 1:
        raise ValueError(f"cannot segment {len(x)} customers into at least {options.k_min} segments")
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(x), size=min(options.silhouette_sample, len(x)), replace=False)
    scores, models = [], {}
    for k in range(options.k_min, min(options.k_max, len(x) - 1) + 1):
        model = segment_pipeline(k, seed).fit(x)
        transformed = model[:-1].transform(x[sample])
        scores.append({"k": k, "silhouette": float(silhouette_score(transformed, model[-1].labels_[sample]))})
        models[k] = model
    silhouette = pd.DataFrame(scores)
    best_k = int(silhouette.loc[silhouette["silhouette"].idxmax(), "k"])
    model = models[best_k]
    labels = model[-1].labels_

    # Order segments by mean monetary value so ids do not depend on K-means' arbitrary label order.
    frame = features.assign(_cluster=labels)
    order = frame.groupby("_cluster")["monetary_total"].mean().sort_values(ascending=False).index
    cluster_to_segment = {cluster: segment for segment, cluster in enumerate(order)}
    frame["segment_id"] = frame["_cluster"].map(cluster_to_segment).astype("int64")

    profiles = frame.groupby("segment_id")[PROFILE_COLUMNS].mean()
    profiles.insert(0, "customers", frame.groupby("segment_id").size())
    profiles.insert(1, "share", profiles["customers"] / len(frame))
    median_tenure = float(features["tenure_days"].median())
    names, seen = [], {}
    for _, profile in profiles.iterrows():
        base = name_segment(profile, median_tenure)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} {seen[base]}")
    profiles.insert(0, "segment_name", names)
    profiles = profiles.reset_index()
    assignments = frame[["customer_id", "segment_id"]].merge(profiles[["segment_id", "segment_name"]],
                                                             on="segment_id", validate="many_to_one")
    silhouette["chosen"] = silhouette["k"] == best_k
    return SegmentOutput(assignments, profiles, silhouette, model)


def segment_section(out: SegmentOutput) -> str:
    view = out.profiles[["segment_id", "segment_name", "customers", "share", "recency_days", "frequency_orders",
                         "monetary_total", "rfm_score"]].copy()
    view["share"] = view["share"].map("{:.1%}".format)
    chosen = out.silhouette.loc[out.silhouette["chosen"]].iloc[0]
    return (f"## Segments\n\nK-means with k={int(chosen['k'])} (best silhouette {chosen['silhouette']:.3f} over "
            f"k={int(out.silhouette['k'].min())}..{int(out.silhouette['k'].max())}).\n\n"
            + markdown_table(view, "{:.1f}"))


def segment_figures(out: SegmentOutput) -> dict[str, plt.Figure]:
    sizes, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(out.profiles["segment_name"], out.profiles["customers"], color="#4C72B0")
    ax.invert_yaxis()
    ax.set_xlabel("customers")
    ax.set_title("Segment sizes")
    sizes.tight_layout()
    curve, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(out.silhouette["k"], out.silhouette["silhouette"], marker="o")
    ax.set_xlabel("k")
    ax.set_ylabel("silhouette")
    ax.set_title("Silhouette by number of segments")
    curve.tight_layout()
    return {"sizes": sizes, "silhouette": curve}


@task(name="segment")
def segment(run: RunSpec, featured: StageResult, options: SegmentOptions, seed: int) -> StageResult:
    store = run.store
    out = fit_segments(store.read_frame(featured.ref("customer_features")), options, seed)
    chosen = out.silhouette.loc[out.silhouette["chosen"]].iloc[0]
    stage_logger().info("segments: k=%d silhouette=%.3f", chosen["k"], chosen["silhouette"])
    artifacts = {
        "assignments": store.write_frame("segments", "assignments", out.assignments),
        "profiles": store.write_frame("segments", "profiles", out.profiles),
        "silhouette": store.write_frame("segments", "silhouette", out.silhouette),
        "model": store.write_with("segments", "model.skops", "model", lambda p: sio.dump(out.model, p)),
    }
    for name, figure in segment_figures(out).items():
        artifacts[f"figure_{name}"] = save_figure(store, "segments", name, figure)
    sizes = dict(zip(out.profiles["segment_name"], out.profiles["customers"].astype(int), strict=True))
    return StageResult(stage="segment", artifacts=artifacts,
                       metrics={"k": int(chosen["k"]), "silhouette": round(float(chosen["silhouette"]), 4),
                                "sizes": sizes},
                       report_section=segment_section(out))
