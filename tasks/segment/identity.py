"""Identity from night to night: centres matched to the previous run's, ids and names kept or issued, rule
groups, and the migration matrix with its stability score.
"""

from __future__ import annotations

from datetime import date
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from crm_analytics.parameters import SegmentOptions
from tasks.segment.clustering import ClusterFit
from tasks.segment.profiles import name_segment, profile_z_scores
from tasks.segment.transforms import transform_kind, transform_matrix

ONE_TIME, LIGHT, OUTLIERS, REPEAT = "one-time buyers", "light buyers", "outliers", "repeat buyers"
RULE_GROUP_ORDER = (REPEAT, OUTLIERS, LIGHT, ONE_TIME)
NOT_IN_RUN = -1
MIGRATION_COLUMNS = ("from_segment_id", "from_segment", "to_segment_id", "to_segment", "customers")


class PreviousSegments(NamedTuple):
    """What tonight needs from the previous complete run to keep segment identities."""

    as_of: date
    assignments: pd.DataFrame  # customer_id, segment_id, segment_name
    profiles: pd.DataFrame  # segment_id, segment_name, segment_kind ("cluster" or "rule")
    centroids: pd.DataFrame  # segment_id, segment_name, one column per clustered feature (original units)
    identity: dict[str, Any]  # next_segment_id, k, method, features


def match_segments(now: np.ndarray, previous: np.ndarray, max_distance: float) -> list[tuple[int, int, float]]:
    """Optimal one-to-one matching of centres (rows) by Euclidean distance; pairs farther than ``max_distance``
    are left unmatched. Returns (tonight's index, previous index, distance)."""
    if len(now) == 0 or len(previous) == 0:
        return []
    cost = cdist(now, previous)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j), float(cost[i, j])) for i, j in zip(rows, cols, strict=True) if cost[i, j] <= max_distance]


def _unique_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base} {n}"
    taken.add(name)
    return name


def migration_matrix(previous: pd.DataFrame, current: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """Customers by (previous segment, tonight's segment), long format; -1 marks "not in that run". The
    stability score is the share of customers in both runs whose segment id did not change."""
    merged = previous[["customer_id", "segment_id", "segment_name"]].merge(
        current[["customer_id", "segment_id", "segment_name"]], on="customer_id", how="outer",
        suffixes=("_from", "_to"), validate="one_to_one")
    for side, label in (("from", "(not in previous run)"), ("to", "(not in this run)")):
        merged[f"segment_id_{side}"] = merged[f"segment_id_{side}"].fillna(NOT_IN_RUN).astype("int64")
        merged[f"segment_name_{side}"] = merged[f"segment_name_{side}"].astype("string").fillna(label)
    both = (merged["segment_id_from"] != NOT_IN_RUN) & (merged["segment_id_to"] != NOT_IN_RUN)
    stability = float((merged.loc[both, "segment_id_from"] == merged.loc[both, "segment_id_to"]).mean()) \
        if both.any() else None
    matrix = (merged.groupby(["segment_id_from", "segment_name_from", "segment_id_to", "segment_name_to"])
              .size().rename("customers").reset_index())
    matrix.columns = list(MIGRATION_COLUMNS)
    return matrix, stability


class Identities(NamedTuple):
    """Tonight's clusters' persistent ids and names, and how they were found."""

    ids: dict[int, int]  # cluster number -> segment id
    names: dict[int, str]
    matches: list[tuple[int, int, float]]  # (cluster number, previous centroid row, distance)
    derived: list[str]  # the name each cluster's profile gives it tonight
    next_id: int


def cluster_identities(clustered: pd.DataFrame, fit: ClusterFit | None, options: SegmentOptions,
                       previous: PreviousSegments | None, comparable: bool) -> Identities:
    """Matched clusters inherit the previous id and name; new ones get fresh ids (most valuable first) and a
    name derived from their profile. Ids are never reused: the previous run's ``next_segment_id`` carries on."""
    k = fit.k if fit is not None else 0
    derived = [name_segment(z) for _, z in profile_z_scores(clustered, fit.labels, k).iterrows()] if k else []
    matches: list[tuple[int, int, float]] = []
    if comparable and k:
        kinds = tuple(transform_kind(c) for c in options.features)
        prev_t = transform_matrix(previous.centroids[list(options.features)].to_numpy(dtype=np.float64), kinds)
        matches = match_segments(fit.centres(), (prev_t - fit.centre) / fit.scale, options.max_match_distance)
    next_id, taken = _next_id(previous), set()
    ids, names = {}, {}
    for i, j, _ in matches:
        ids[i] = int(previous.centroids["segment_id"].iloc[j])
        names[i] = _unique_name(str(previous.centroids["segment_name"].iloc[j]), taken)
    value = [float(clustered["monetary_total"].to_numpy()[fit.labels == c].mean()) if "monetary_total" in clustered
             else 0.0 for c in range(k)]
    for c in sorted(range(k), key=lambda c: -value[c]):
        if c not in ids:
            ids[c], names[c], next_id = next_id, _unique_name(derived[c], taken), next_id + 1
    return Identities(ids, names, matches, derived, next_id)


def assign_segments(features: pd.DataFrame, eligible: np.ndarray, labels: np.ndarray, identities: Identities,
                    clustering_ran: bool, previous: PreviousSegments | None) -> tuple[pd.DataFrame, int]:
    """One row per customer: a cluster, or a rule-based group (too few orders to tell their kind; DBSCAN noise;
    too few customers to cluster at all). Rule groups keep their ids by name. Returns the next free id too."""
    n, next_id = len(features), identities.next_id
    group = np.where(features["frequency_orders"].to_numpy() <= 1, ONE_TIME, LIGHT).astype(object)
    group[eligible[labels < 0]] = OUTLIERS if clustering_ran else REPEAT
    segment_id, segment_name, kind = np.full(n, -1, dtype=np.int64), group.copy(), np.full(n, "rule", dtype=object)
    in_cluster = eligible[labels >= 0]
    segment_id[in_cluster] = [identities.ids[c] for c in labels[labels >= 0]]
    segment_name[in_cluster] = [identities.names[c] for c in labels[labels >= 0]]
    kind[in_cluster] = "cluster"
    previous_rule_ids = _previous_rule_ids(previous)
    for name in RULE_GROUP_ORDER:
        rows = (kind == "rule") & (group == name)
        if rows.any():
            if name in previous_rule_ids:
                segment_id[rows] = previous_rule_ids[name]
            else:
                segment_id[rows], next_id = next_id, next_id + 1
    assignments = pd.DataFrame({
        "customer_id": features["customer_id"],
        "segment_id": segment_id,
        "segment_name": pd.array(segment_name, dtype="string"),
        "segment_kind": pd.array(kind, dtype="string"),
    })
    return assignments, max(next_id, int(segment_id.max(initial=-1)) + 1)


def _next_id(previous: PreviousSegments | None) -> int:
    if previous is None:
        return 0
    used = [int(previous.profiles["segment_id"].max()) + 1] if len(previous.profiles) else []
    return max([int(previous.identity.get("next_segment_id", 0)), *used])


def _previous_rule_ids(previous: PreviousSegments | None) -> dict[str, int]:
    if previous is None or "segment_kind" not in previous.profiles.columns:
        return {}
    rules = previous.profiles[previous.profiles["segment_kind"] == "rule"]
    return {str(name): int(i) for name, i in zip(rules["segment_name"], rules["segment_id"], strict=True)}
