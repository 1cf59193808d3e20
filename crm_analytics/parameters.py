"""The run's parameters: one typed model, rendered by the Prefect UI as a form a person can fill."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from crm_analytics.artifacts import RunStore


class ValidationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_quarantine_rate: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Fail the run, before any model is retrained, if more than this fraction of an entity's "
        "rows is quarantined.",
    )


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k_min: int = Field(3, ge=2, le=20, description="Smallest number of segments tried.")
    k_max: int = Field(8, ge=2, le=30, description="Largest number of segments tried (best silhouette wins).")
    silhouette_sample: int = Field(4000, ge=200, description="Customers sampled to score the silhouette.")


class ChurnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    horizon_days: int = Field(
        90, ge=7, le=365, description="A customer has churned if they make no purchase in this many days."
    )


class RulesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_support: float = Field(0.01, gt=0.0, le=1.0, description="Minimum share of baskets holding an itemset.")
    min_confidence: float = Field(0.2, gt=0.0, le=1.0, description="Minimum P(consequent | antecedent).")
    min_lift: float = Field(1.5, ge=0.0, description="Minimum lift of a rule.")
    max_len: int = Field(3, ge=2, le=6, description="Largest itemset size mined.")
    top_n: int = Field(5, ge=1, le=50, description="Recommendations kept per customer.")


class PipelineOptions(BaseModel):
    """Everything about a run except its date. Defaults suit the generated sample export."""

    model_config = ConfigDict(extra="forbid")

    mapping: str = Field(
        "sample", description="Source mapping: a shipped name (sample, online_retail) or a path to a YAML file."
    )
    data_root: str | None = Field(
        None, description="Root of landing/ and runs/; empty means the CRM_DATA_ROOT setting."
    )
    seed: int = Field(42, description="Seed for every random choice (sampling, model fitting).")
    validation: ValidationOptions = ValidationOptions()
    segments: SegmentOptions = SegmentOptions()
    churn: ChurnOptions = ChurnOptions()
    rules: RulesOptions = RulesOptions()


class RunSpec(BaseModel):
    """Which run a task works on: passed to every stage task."""

    model_config = ConfigDict(frozen=True)

    data_root: Path
    as_of: date

    @property
    def store(self) -> RunStore:
        return RunStore(self.data_root, self.as_of)
