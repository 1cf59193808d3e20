"""Segment: cluster customers on how they buy, name the segments from their profiles, and keep each segment's
id and name from night to night.

Who is clustered: customers with at least ``min_orders`` orders. A customer's kind (how often they order
while active, how big and how pricey their baskets are, how much they return) can only be measured from
enough orders; with fewer, every kind looks alike, so those customers go to two rule-based groups, "one-time
buyers" and "light buyers", instead of being scattered over the clusters at random.

What is clustered: by default behaviour *while active* (usual gap between orders, lines per order, typical
unit price, return rate), not recency or tenure. A customer who stopped buying a year ago is still the same
kind of customer, and segments built on how people buy do not drift as everyone ages by a day; where a
customer is in their life cycle (new, active, at risk, hibernating) is a separate column, by rule.

How: skewed features are log-transformed and proportions square-rooted, then standardised; K-means with k
chosen by silhouette over a range (on a seeded sample), agglomerative (Ward) or DBSCAN by parameter. K-means
and agglomerative are then refitted once with each feature scaled by its pooled spread *inside* the first
fit's segments, so a feature that separates segments is not diluted by that very separation.

Stable identity: tonight's segment centres are matched to the previous complete run's (Hungarian assignment
on distances in tonight's scaled space); a matched segment keeps its id and name, an unmatched one gets a new
id and a name derived from its profile. The migration matrix counts customers by (previous, tonight's)
segment, and the stability score is the share of customers seen in both runs whose segment did not change.

Layout of the package (each module holds one responsibility; this module re-exports the names the single
``tasks/segment.py`` had, so ``from tasks.segment import ...`` keeps working, and saved models that name
``tasks.segment.transform_matrix`` keep loading):

- ``transforms``: feature transforms and the seeded hash order.
- ``clustering``: scaling, choice of k, K-means / Ward / DBSCAN fits and assignment.
- ``profiles``: segment names from profiles, life-cycle states, per-segment summaries.
- ``identity``: matching to the previous run, ids and names, rule groups, migration and stability.
- ``model``: the saved model (a scikit-learn pipeline) and its loader.
- ``core``: the pure core ``fit_segments``.
- ``report``: the report section, migration table and figures.
- ``stage``: the Prefect task edge ``segment`` and the previous run's segments it reads.
"""

from __future__ import annotations

from tasks.segment.clustering import (
    AGGLOMERATIVE_MAX,
    DBSCAN_MAX,
    ClusterFit,
    assign_dbscan,
    choose_clusters,
    cluster_customers,
    refit_within,
)
from tasks.segment.core import (
    PROJECTION_POINTS,
    SegmentOutput,
    fit_segments,
)
from tasks.segment.identity import (
    LIGHT,
    MIGRATION_COLUMNS,
    NOT_IN_RUN,
    ONE_TIME,
    OUTLIERS,
    REPEAT,
    RULE_GROUP_ORDER,
    Identities,
    PreviousSegments,
    assign_segments,
    cluster_identities,
    match_segments,
    migration_matrix,
)
from tasks.segment.model import (
    SEGMENT_MODEL_TYPES,
    UntrustedSegmentModelError,
    load_segment_model,
    segment_model,
)
from tasks.segment.profiles import (
    LIFECYCLE_STATES,
    PROFILE_COLUMNS,
    lifecycle,
    name_segment,
    profile_z_scores,
    segment_profiles,
)
from tasks.segment.report import (
    migration_table,
    segment_figures,
    segment_section,
)
from tasks.segment.stage import (
    SEGMENT_FILES,
    previous_fingerprint,
    read_previous,
    segment,
)
from tasks.segment.transforms import (
    LINEAR,
    LOG,
    LOG_FEATURES,
    SQRT,
    hash_order,
    inverse_transform_matrix,
    transform_kind,
    transform_matrix,
)

__all__ = [
    "AGGLOMERATIVE_MAX",
    "ClusterFit",
    "DBSCAN_MAX",
    "Identities",
    "LIFECYCLE_STATES",
    "LIGHT",
    "LINEAR",
    "LOG",
    "LOG_FEATURES",
    "MIGRATION_COLUMNS",
    "NOT_IN_RUN",
    "ONE_TIME",
    "OUTLIERS",
    "PROFILE_COLUMNS",
    "PROJECTION_POINTS",
    "PreviousSegments",
    "REPEAT",
    "RULE_GROUP_ORDER",
    "SEGMENT_FILES",
    "SEGMENT_MODEL_TYPES",
    "SQRT",
    "SegmentOutput",
    "UntrustedSegmentModelError",
    "assign_dbscan",
    "assign_segments",
    "choose_clusters",
    "cluster_customers",
    "cluster_identities",
    "fit_segments",
    "hash_order",
    "inverse_transform_matrix",
    "lifecycle",
    "load_segment_model",
    "match_segments",
    "migration_matrix",
    "migration_table",
    "name_segment",
    "previous_fingerprint",
    "profile_z_scores",
    "read_previous",
    "refit_within",
    "segment",
    "segment_figures",
    "segment_model",
    "segment_profiles",
    "segment_section",
    "transform_kind",
    "transform_matrix",
]
