"""The churn task edge: picks the label source, loads last night's champion, and writes the outputs, the
model file and its sidecar, the figures and the report section."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pyarrow.parquet as pq

from crm_analytics.artifacts import ArtifactRef, RunStore, StageResult, code_version
from crm_analytics.parameters import ChurnOptions, RunSpec
from crm_analytics.partitions import checked_partitions
from crm_analytics.reporting import save_figures
from tasks.churn.champion import ChurnOutput, load_champion
from tasks.churn.examples import ID, ChurnNotPossible, LineParts
from tasks.churn.explicit import train_explicit
from tasks.churn.model_files import dump_model
from tasks.churn.report import churn_figures, churn_section
from tasks.churn.transactional import train_and_score
from tasks.common import previous_run_state, stage_logger, stage_task


def publish(run: RunSpec, out: ChurnOutput, input_hashes: dict[str, str]) -> StageResult:
    """Write the churn outputs, the model and its sidecar, the figures, and the report section."""
    store = run.store
    metadata = {**out.model_metadata, "code_version": code_version(), "input_hashes": input_hashes,
                "written_as_of": run.as_of.isoformat()}
    artifacts = {
        "training_set": store.write_frame("churn", "training_set", out.training_set),
        "validation_predictions": store.write_frame("churn", "validation_predictions", out.validation_predictions),
        "model_comparison": store.write_frame("churn", "model_comparison", out.comparison),
        "scores": store.write_frame("churn", "scores", out.scores),
        "calibration": store.write_frame("churn", "calibration", out.calibration),
        "importances": store.write_frame("churn", "importances", out.importances),
        "metrics": store.write_json("churn", "metrics", out.metrics),
        "model": store.write_with("churn", "model.skops", "model", lambda p: dump_model(out.model, p)),
        "model_metadata": store.write_json("churn", "model", metadata),
    }
    if out.model_inputs is not None:
        artifacts["model_inputs"] = store.write_frame("churn", "model_inputs", out.model_inputs)
    if len(out.gaps):
        artifacts["interpurchase_gaps"] = store.write_frame("churn", "interpurchase_gaps", out.gaps.to_frame())
    advice = out.metrics.get("horizon") or {}
    artifacts.update(save_figures(store, "churn", lambda: churn_figures(
        out.validation_predictions, out.calibration, out.importances, out.gaps, out.metrics.get("horizon_days"),
        advice.get("suggested_horizon_days"))))
    v = out.metrics["validation"]
    summary = {k: out.metrics.get(k) for k in ("label_source", "chosen_model", "challenger_model", "promoted",
                                               "horizon_days", "train_cutoff", "validation_cutoff")}
    summary |= {"validation_roc_auc": round(v["roc_auc"], 4), "validation_pr_auc": round(v["pr_auc"], 4),
                "scored_customers": len(out.scores)}
    return StageResult(stage="churn", artifacts=artifacts, metrics=summary,
                       report_section=churn_section(out.metrics, out.comparison, out.calibration))


@stage_task("churn", fingerprint_extra=previous_run_state("churn"))
def churn(run: RunSpec, cleaned: StageResult, options: ChurnOptions, seed: int,
          validated: StageResult | None = None) -> StageResult:
    """Explicit labels when the mapping supplies a ``churn_labels`` entity; otherwise labels from transactions.
    Data that cannot support a model (``ChurnNotPossible``: e.g. undated baskets) skips the stage with the reason
    in the log and the report."""
    try:
        return _churn(run, cleaned, options, seed, validated)
    except ChurnNotPossible as exc:
        stage_logger().warning("churn skipped: %s", exc)
        return StageResult(stage="churn", artifacts={}, metrics={"skipped": str(exc)},
                           report_section=f"## Churn\n\n**Skipped:** {str(exc).rstrip('.')}.")


def _churn(run: RunSpec, cleaned: StageResult, options: ChurnOptions, seed: int,
           validated: StageResult | None) -> StageResult:
    store = run.store
    if validated is not None and "churn_labels" in validated.artifacts:
        customers_ref, labels_ref = cleaned.ref("customers"), validated.ref("churn_labels")
        # A label row repeated exactly (e.g. read from a customer table with a repeated row) is one label; two
        # different labels for one customer never get here (the suite's uniqueness check quarantines them).
        labels = store.read_frame(labels_ref, columns=[ID, "churned"]).drop_duplicates(ignore_index=True)
        table = store.read_frame(customers_ref).merge(labels, on=ID, how="inner", validate="one_to_one")
        return explicit_stage(run, table, "churned", ID, options, seed,
                              {"customers": customers_ref.content_hash, "churn_labels": labels_ref.content_hash})
    champion, why_not = load_champion(store.previous_complete(), "transactions")
    refs = {name: cleaned.ref(name) for name in ("customers", "order_lines")}
    # Of the customers, the transactional trainer reads the ids and signup dates only (a third of the table).
    customers = store.read_frame(refs["customers"], columns=[ID, "signup_date"])
    out = train_and_score(customers, line_parts(store, refs["order_lines"]), run.as_of, options, seed,
                          champion=champion, no_champion_reason=why_not)
    v = out.metrics["validation"]
    stage_logger().info("churn: %s scores (%s); validation ROC AUC %.3f, PR AUC %.3f", out.metrics["chosen_model"],
                        out.metrics["decision"], v["roc_auc"], v["pr_auc"])
    return publish(run, out, {name: ref.content_hash for name, ref in refs.items()})


def line_parts(store: RunStore, ref: ArtifactRef) -> LineParts:
    """The clean order lines as their customer partitions, each read when a pass gets to it and checked to be
    ``crm_analytics.partitions``' partitions (churn relies on every line of a customer being in one part)."""
    count = len(ref.part_files)
    present = set(pq.read_schema(ref.part_files[0]).names)

    def read(columns: list[str]) -> Iterator[pd.DataFrame]:
        parts = store.read_parts(ref, columns=[c for c in columns if c in present])
        return checked_partitions(parts, count) if count > 1 else parts

    return LineParts(read, count, tuple(ref.sort_by or ()) if count > 1 else ())


def explicit_stage(run: RunSpec, table: pd.DataFrame, label_column: str, id_column: str, options: ChurnOptions,
                   seed: int, input_hashes: dict[str, str]) -> StageResult:
    """The churn edge for explicit labels (one row per customer with its label and its own columns): weighs the
    previous run's explicit-label model against tonight's cross-validated challenger, then writes the same
    artifacts as the transactional edge. Call it from a task once the table is assembled."""
    champion, why_not = load_champion(run.store.previous_complete(), "explicit")
    out = train_explicit(table, label_column, id_column, options, seed, champion=champion,
                         no_champion_reason=why_not, as_of=run.as_of)
    stage_logger().info("churn (explicit labels): %s scores (%s); CV ROC AUC %.3f", out.metrics["chosen_model"],
                        out.metrics["decision"], out.metrics["validation"]["roc_auc"])
    return publish(run, out, input_hashes)
