"""The segment stage's Prefect task edge: read the previous complete run's segments, fit, write the artifacts."""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from crm_analytics.artifacts import RunStore, StageResult, dump_skops
from crm_analytics.parameters import RunSpec, SegmentOptions
from crm_analytics.reporting import save_figures
from tasks.common import stage_logger, stage_task
from tasks.segment.core import fit_segments
from tasks.segment.identity import PreviousSegments
from tasks.segment.report import segment_figures, segment_section

SEGMENT_FILES = ("assignments.parquet", "profiles.parquet", "centroids.parquet", "identity.json")


def read_previous(store: RunStore) -> PreviousSegments | None:
    """The previous complete run's segments, read through its manifest (its artifacts are not tonight's inputs)."""
    previous = store.previous_complete()
    if previous is None or (assignments := previous.artifact("segments", "assignments")) is None:
        return None

    def frame(name: str) -> pd.DataFrame:
        ref = previous.artifact("segments", name)
        return previous.read_frame(ref) if ref is not None else pd.DataFrame(columns=["segment_id", "segment_name"])

    identity = previous.artifact("segments", "identity")
    return PreviousSegments(previous.as_of, previous.read_frame(assignments), frame("profiles"), frame("centroids"),
                            previous.read_json(identity) if identity is not None else {})


def previous_fingerprint(run: RunSpec, **_: Any) -> str:
    """Tonight's segments depend on the previous complete run's: its files enter the stage's cache key."""
    previous = run.store.previous_complete()
    if previous is None:
        return "no previous run"
    digest = hashlib.sha256(previous.as_of.isoformat().encode())
    for name in SEGMENT_FILES:
        ref = previous.artifact("segments", name.split(".")[0])
        digest.update(f"{name}:{ref.content_hash if ref is not None else '-'}".encode())
    return digest.hexdigest()


@stage_task("segment", fingerprint_extra=previous_fingerprint)
def segment(run: RunSpec, featured: StageResult, options: SegmentOptions, seed: int) -> StageResult:
    store = run.store
    log = stage_logger()
    out = fit_segments(store.read_frame(featured.ref("customer_features")), options, seed, read_previous(store))
    identity = out.identity
    log.info("segments: k=%d, %d clustered customers, stability %s", identity["k"],
             identity["clustered_customers"], identity["stability"])
    if identity["stability"] is not None and identity["stability"] < options.min_stability:
        log.warning("segment stability %.1f%% since %s is below %.0f%%: many customers changed segment",
                    100 * identity["stability"], identity["previous_as_of"], 100 * options.min_stability)
    if identity["previous_as_of"] is not None and not identity["comparable_with_previous"]:
        log.warning("segment features or method changed since %s: segments were given new ids",
                    identity["previous_as_of"])
    artifacts = {
        "assignments": store.write_frame("segments", "assignments", out.assignments),
        "profiles": store.write_frame("segments", "profiles", out.profiles),
        "silhouette": store.write_frame("segments", "silhouette", out.silhouette),
        "centroids": store.write_frame("segments", "centroids", out.centroids),
        "migration": store.write_frame("segments", "migration", out.migration),
        "identity": store.write_json("segments", "identity", identity),
    }
    if out.model is not None:
        artifacts["model"] = store.write_with("segments", "model.skops", "model", lambda p: dump_skops(out.model, p))
    if not out.assignments.empty:
        artifacts.update(save_figures(store, "segments", lambda: segment_figures(out)))
    chosen = out.silhouette.loc[out.silhouette["chosen"].astype(bool)]
    sizes = dict(zip(out.profiles["segment_name"], out.profiles["customers"].astype(int), strict=True))
    metrics = {
        "k": identity["k"],
        "silhouette": round(float(chosen["silhouette"].iloc[0]), 4) if len(chosen) else None,
        "clustered_customers": identity["clustered_customers"],
        "sizes": sizes,
        "stability": identity["stability"],
        "matched_segments": len(identity["matched"]),
        "new_segments": len(identity["new_segments"]),
        "retired_segments": len(identity["retired_segments"]),
    }
    return StageResult(stage="segment", artifacts=artifacts, metrics=metrics,
                       report_section=segment_section(out, options))
