"""The value stage's Prefect task edge: read tonight's clean order lines, churn scores, segments and
recommendations, call the core, write the tables, the figure and the report section."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec, ValueOptions
from crm_analytics.privacy import pseudonym_key
from crm_analytics.reporting import save_figures
from tasks.churn.model_files import factors_on_demand
from tasks.common import stage_logger, stage_task
from tasks.value.actions import FactorSource
from tasks.value.clv import ValueNotPossible
from tasks.value.core import customer_value
from tasks.value.report import clv_by_segment_figure, skipped_section, value_section

ORDER_LINE_COLUMNS = ["customer_id", "order_id", "order_ts", "quantity", "is_return", "line_amount",
                      "returned_quantity"]


def key_fingerprint(run: RunSpec, **_: Any) -> str:
    """The pseudonyms depend on the key: a changed key must redo the stage (the key itself never leaves)."""
    return hmac.new(pseudonym_key(run.data_root), b"value-stage", hashlib.sha256).hexdigest()[:16]


def _optional_frame(run: RunSpec, result: StageResult, name: str, wanted: Callable[[str], bool]):
    """The columns ``wanted`` of an upstream artifact, or None when the stage wrote none (it was skipped)."""
    if name not in result.artifacts:
        return None
    ref = result.ref(name)
    return run.store.read_frame(ref, columns=[c for c in pq.read_schema(ref.path).names if wanted(c)])


def churn_factor_source(run: RunSpec, churned: StageResult) -> FactorSource | None:
    """The churn model's top factors on demand, when the churn stage saved its model inputs instead of them."""
    if not {"model", "model_metadata", "model_inputs"} <= set(churned.artifacts):
        return None
    metadata = run.store.read_json(churned.ref("model_metadata"))
    return lambda ids: factors_on_demand(churned.ref("model").file, metadata, churned.ref("model_inputs").file, ids)


@stage_task("value", fingerprint_extra=key_fingerprint)
def value(run: RunSpec, cleaned: StageResult, segmented: StageResult, churned: StageResult, mined: StageResult,
          options: ValueOptions, risk_band_edges: list[float]) -> StageResult:
    """Lifetime value, value at risk and the action list. An export that cannot support the model, or a fit that
    is not usable, skips the stage with the reason (and the fits' diagnostics) in the log, report and manifest."""
    store, log = run.store, stage_logger()
    lines_ref = cleaned.ref("order_lines")
    present = set(pq.read_schema(lines_ref.path).names)
    # Part by part (every line of a customer is in one part): one part's lines are held at a time, not the export.
    sort_by = lines_ref.sort_by if lines_ref.parts is not None and len(lines_ref.parts) > 1 else None
    wanted = list(dict.fromkeys([*ORDER_LINE_COLUMNS, *(sort_by or [])]))
    lines = store.read_parts(lines_ref, columns=[c for c in wanted if c in present])
    scores = _optional_frame(run, churned, "scores", lambda c: c in ("customer_id", "churn_probability",
                                                                     "risk_band") or c.startswith("factor_"))
    assignments = _optional_frame(run, segmented, "assignments", lambda c: c in ("customer_id", "segment_id",
                                                                                 "segment_name", "lifecycle"))
    recommendations = _optional_frame(run, mined, "recommendations", lambda c: c in ("customer_id", "rank", "item"))
    try:
        out = customer_value(lines, run.as_of, options, pseudonym_key(run.data_root), scores, assignments,
                             recommendations, risk_band_edges, churn_factor_source(run, churned), sort_by)
    except ValueNotPossible as exc:
        log.warning("value skipped: %s", exc)
        return StageResult(stage="value", artifacts={}, metrics={"skipped": str(exc), "fits": exc.fits},
                           report_section=skipped_section(str(exc), exc.fits))
    artifacts = {
        "customer_value": store.write_frame("value", "customer_value", out.customer_value),
        "actions": store.write_frame("value", "actions", out.actions),
        "value_by_segment": store.write_frame("value", "value_by_segment", out.by_segment),
        "recent_orders": store.write_frame("value", "recent_orders", out.recent_orders),
    }
    artifacts.update(save_figures(store, "value", lambda: {
        "clv_by_segment": clv_by_segment_figure(out.customer_value, options.horizon_months)}))
    log.info("value: %d customers, CLV %.2f, value at risk %.2f, %d actions", out.metrics["customers_valued"],
             out.metrics["total_clv"], out.metrics["total_value_at_risk"], out.metrics["action_rows"])
    return StageResult(stage="value", artifacts=artifacts, metrics=out.metrics,
                       report_section=value_section(out.metrics, out.by_segment, out.actions))
