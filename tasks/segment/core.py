"""The segment stage's pure core: cluster, name and profile customers, keeping identities from the previous run."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline

from crm_analytics.parameters import SegmentOptions
from tasks.segment.clustering import cluster_customers
from tasks.segment.identity import (
    MIGRATION_COLUMNS,
    PreviousSegments,
    assign_segments,
    cluster_identities,
    migration_matrix,
)
from tasks.segment.model import segment_model
from tasks.segment.profiles import lifecycle, segment_profiles
from tasks.segment.transforms import hash_order, inverse_transform_matrix, transform_kind

PROJECTION_POINTS = 5_000


class SegmentOutput(NamedTuple):
    """Tonight's segments, what makes them comparable with tomorrow's, and what a person reads about them."""

    assignments: pd.DataFrame
    profiles: pd.DataFrame
    silhouette: pd.DataFrame
    model: Pipeline | None
    centroids: pd.DataFrame
    migration: pd.DataFrame
    identity: dict[str, Any]
    projection: pd.DataFrame


def fit_segments(features: pd.DataFrame, options: SegmentOptions, seed: int,
                 previous: PreviousSegments | None = None) -> SegmentOutput:
    """Cluster, name and profile customers; match segment identities to ``previous`` when given."""
    missing = [c for c in [*options.features, "customer_id", "frequency_orders"] if c not in features.columns]
    if missing:
        raise ValueError(f"segment features {missing} are not in the feature table; it has {list(features.columns)}")
    features = features.reset_index(drop=True)
    kinds = tuple(transform_kind(c) for c in options.features)
    eligible = np.flatnonzero(features["frequency_orders"].to_numpy() >= options.min_orders)
    clustered = features.iloc[eligible].reset_index(drop=True)
    previous_identity = previous.identity if previous is not None else {}
    comparable = (previous is not None and previous_identity.get("features") == list(options.features)
                  and all(c in previous.centroids.columns for c in options.features))
    same_method = comparable and previous_identity.get("method") == options.method

    fit = None
    if len(eligible) >= max(10 * options.k_min, 30):
        fit = cluster_customers(clustered, options, seed, previous_identity.get("k") if same_method else None)
    k = fit.k if fit is not None else 0
    labels = fit.labels if fit is not None else np.full(len(eligible), -1, dtype=np.int64)
    identities = cluster_identities(clustered, fit, options, previous, comparable)
    assignments, next_id = assign_segments(features, eligible, labels, identities, fit is not None, previous)
    assignments["lifecycle"] = lifecycle(features, options.new_customer_days)

    centres_z = fit.centres() if k else np.empty((0, len(kinds)))
    centres = inverse_transform_matrix(centres_z * fit.scale + fit.centre, kinds) if k else centres_z
    centroids = pd.DataFrame(centres, columns=list(options.features))
    centroids.insert(0, "segment_id", pd.array([identities.ids[c] for c in range(k)], dtype="int64"))
    centroids.insert(1, "segment_name", pd.array([identities.names[c] for c in range(k)], dtype="string"))
    if previous is not None:
        migration, stability = migration_matrix(previous.assignments, assignments)
    else:
        migration, stability = pd.DataFrame(columns=list(MIGRATION_COLUMNS)), None
    matched = {identities.ids[i] for i, _, _ in identities.matches}
    identity = {
        "previous_as_of": previous.as_of.isoformat() if previous is not None else None,
        "method": options.method,
        "features": list(options.features),
        "min_orders": options.min_orders,
        "k": k,
        "next_segment_id": next_id,
        "clustered_customers": int((assignments["segment_kind"] == "cluster").sum()),
        "matched": [{"segment_id": identities.ids[i], "segment_name": identities.names[i], "distance": round(d, 4),
                     "profile_name_tonight": identities.derived[i]} for i, _, d in identities.matches],
        "new_segments": [{"segment_id": identities.ids[c], "segment_name": identities.names[c]}
                         for c in range(k) if identities.ids[c] not in matched],
        "retired_segments": [] if previous is None else [
            {"segment_id": int(i), "segment_name": str(name)} for i, name in
            zip(previous.centroids["segment_id"], previous.centroids["segment_name"], strict=True)
            if int(i) not in matched],
        "comparable_with_previous": bool(comparable),
        "stability": round(stability, 6) if stability is not None else None,
    }
    silhouette = fit.silhouette if fit is not None else pd.DataFrame(
        {"k": pd.Series(dtype="int64"), "silhouette": pd.Series(dtype="float64"), "chosen": pd.Series(dtype=bool)})
    ids = [identities.ids[c] for c in range(k)]
    model = segment_model(kinds, fit.imputer, fit.centre, fit.scale, centres_z, ids) if k else None
    names = [identities.names[c] for c in range(k)]
    projection = _projection(fit.z if k else centres_z, labels, clustered, seed, names, centres_z)
    return SegmentOutput(assignments, segment_profiles(features, assignments), silhouette, model,
                         centroids.sort_values("segment_id", ignore_index=True), migration, identity, projection)


def _projection(z: np.ndarray, labels: np.ndarray, clustered: pd.DataFrame, seed: int, names: list[str],
                centres_z: np.ndarray) -> pd.DataFrame:
    """Two principal components of a sample of clustered customers (and the segment centres) for a figure."""
    columns = ["pc1", "pc2", "segment", "is_centre"]
    keep = np.flatnonzero(labels >= 0)
    if len(keep) < 3 or z.shape[1] < 2:
        return pd.DataFrame(columns=columns)
    rows = keep[np.isin(keep, hash_order(clustered["customer_id"], seed)[:PROJECTION_POINTS])]
    pca = PCA(n_components=2, random_state=seed).fit(z[rows])
    points = pca.transform(z[rows])
    centres = pca.transform(centres_z)
    return pd.DataFrame({
        "pc1": np.r_[points[:, 0], centres[:, 0]],
        "pc2": np.r_[points[:, 1], centres[:, 1]],
        "segment": [names[c] for c in labels[rows]] + names,
        "is_centre": np.r_[np.zeros(len(rows), bool), np.ones(len(names), bool)],
    })
