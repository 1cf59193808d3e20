"""Validate: run the Great Expectations suite of each entity and split its rows into valid and quarantined.

The suites in ``expectations/`` are the single source of truth for what a valid row is. Every ingested row
ends up in exactly one of ``validated/<entity>.parquet`` or ``quarantine/<entity>.parquet`` (with the
reasons it failed and its source file and line), so ``rows in = valid + quarantined`` always holds.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from datetime import date
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from crm_analytics.artifacts import StageResult
from crm_analytics.mapping import load_mapping, mapping_fingerprint
from crm_analytics.parameters import RunSpec, ValidationOptions, as_of_end
from crm_analytics.privacy import pseudonym_key, pseudonymise
from crm_analytics.reporting import markdown_table
from crm_analytics.schema import ENTITIES, PARSE_ERRORS, QUARANTINE_REASON
from tasks.common import DataQualityError, stage_logger, stage_task
from tasks.suites import CROSS_CHECK_ROWS, Engine, evaluate_suite, load_suite

__all__ = ["check_quarantine_rate", "load_suite", "suite_parameters", "validate", "validate_entity"]

UNIQUENESS_EXPECTATIONS = {"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"}


class ValidationOutcome(NamedTuple):
    valid: pd.DataFrame
    quarantine: pd.DataFrame
    reason_counts: dict[str, int]
    evaluation: dict[str, Any]


# ---- pure core ------------------------------------------------------------------------------------------
def suite_parameters(as_of: date, **extra: Any) -> dict[str, Any]:
    """Values for the ``$PARAMETER`` placeholders in the suites."""
    return {"as_of_end": as_of_end(as_of), "as_of_year": as_of.year, **extra}


def validate_entity(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any],
                    engine: Engine = "compiled", cross_check_rows: int = CROSS_CHECK_ROWS) -> ValidationOutcome:
    """Split ``frame`` into valid rows and quarantined rows (with ``_quarantine_reason``).

    Uniqueness is judged on distinct rows: an exact duplicate is not a conflicting key (the clean stage
    drops it and counts it); it gets the verdict of its first copy.
    """
    frame = frame.reset_index(drop=True)
    data_columns = [c for c in frame.columns if not c.startswith("_")]
    if any(e["type"] in UNIQUENESS_EXPECTATIONS for e in suite["expectations"]):
        row_hash = pd.util.hash_pandas_object(frame[data_columns], index=False)
        duplicate = row_hash.duplicated(keep="first")
        first_label = pd.Series(row_hash.index[~duplicate], index=row_hash[~duplicate].to_numpy())
        representative = row_hash.map(first_label).to_numpy()
        checked = frame[~duplicate.to_numpy()]
    else:
        representative = frame.index.to_numpy()
        checked = frame
    failures, evaluation = evaluate_suite(checked, suite, parameters, engine, cross_check_rows)
    # Labels are positions after reset_index; every row takes the verdict of its representative copy.
    reason_text = np.full(len(frame), "", dtype=object)
    counts: Counter[str] = Counter()
    for reason, labels in failures.items():
        hit = np.zeros(len(frame), dtype=bool)
        hit[np.asarray(labels, dtype=np.int64)] = True
        hit = hit[representative]
        counts[reason] += int(hit.sum())
        previous = reason_text[hit]
        reason_text[hit] = np.where(previous == "", reason, previous + "; " + reason)
    failed = reason_text != ""
    quarantine = frame[failed].assign(**{QUARANTINE_REASON: pd.array(reason_text[failed], dtype="string")})
    valid = frame[~failed].drop(columns=[PARSE_ERRORS], errors="ignore").reset_index(drop=True)
    return ValidationOutcome(valid, quarantine.reset_index(drop=True), dict(counts.most_common()), evaluation)


def check_quarantine_rate(entity: str, rows_in: int, quarantined: int, reason_counts: dict[str, int],
                          max_rate: float) -> float:
    """Raise :class:`DataQualityError` naming the entity, its rate and top reasons when over ``max_rate``."""
    rate = quarantined / rows_in if rows_in else 0.0
    if rate > max_rate:
        top = ", ".join(f"{reason} ({count})" for reason, count in list(reason_counts.items())[:3])
        raise DataQualityError(
            f"data-quality gate: {entity} quarantined {quarantined} of {rows_in} rows ({rate:.1%} > "
            f"{max_rate:.1%} allowed); top reasons: {top}. No model was retrained; see quarantine/{entity}.parquet"
        )
    return rate


def quality_section(metrics: dict[str, dict[str, Any]]) -> str:
    rows = pd.DataFrame([
        {"entity": entity, "rows in": m["rows_in"], "valid": m["valid"], "quarantined": m["quarantined"],
         "rate": f"{m['quarantine_rate']:.2%}",
         "top reasons": "; ".join(f"{r} ({n})" for r, n in list(m["reasons"].items())[:3]) or "-"}
        for entity, m in metrics.items()
    ])
    return "## Data quality\n\n" + markdown_table(rows)


# ---- IO edge ------------------------------------------------------------------------------------------------
def _validate_fingerprint(run: RunSpec, mapping_name: str, **_: Any) -> str:
    # The mapping (pii, gates) and the pseudonym key shape the outputs; the key enters only as an HMAC.
    probe = hmac.new(pseudonym_key(run.data_root), b"fingerprint", hashlib.sha256).hexdigest()[:16]
    return f"{mapping_fingerprint(mapping_name)}:{probe}"


@stage_task("validate", fingerprint_extra=_validate_fingerprint)
def validate(run: RunSpec, ingested: StageResult, options: ValidationOptions, mapping_name: str) -> StageResult:
    """Validate customers and products first, then order lines and labels against the valid ids.

    Personal columns are pseudonymised in everything this stage writes (validated and quarantined rows);
    the raw values stay in ``raw/`` only.
    """
    log = stage_logger()
    store = run.store
    mapping = load_mapping(mapping_name)
    key = pseudonym_key(run.data_root)
    artifacts, metrics, valid_ids = {}, {}, {}
    for entity in [e for e in ENTITIES if e in ingested.artifacts]:
        frame = store.read_frame(ingested.ref(entity))
        extra = {}
        if entity in ("order_lines", "churn_labels"):
            extra = {"known_customer_ids": valid_ids["customers"], "known_product_ids": valid_ids["products"]}
        outcome = validate_entity(frame, load_suite(entity), suite_parameters(run.as_of, **extra),
                                  options.engine, options.cross_check_rows)
        key_column = {"customers": "customer_id", "products": "product_id"}.get(entity)
        if key_column:
            valid_ids[entity] = outcome.valid[key_column].dropna().unique().tolist()
        pii = mapping.source(entity).pii
        artifacts[entity] = store.write_frame("validated", entity, pseudonymise(outcome.valid, pii, key))
        artifacts[f"quarantine_{entity}"] = store.write_frame("quarantine", entity,
                                                              pseudonymise(outcome.quarantine, pii, key))
        rows_in, quarantined = len(frame), len(outcome.quarantine)
        if rows_in != len(outcome.valid) + quarantined:
            raise AssertionError(f"{entity}: {rows_in} rows in but {len(outcome.valid)} valid + {quarantined} "
                                 "quarantined")
        metrics[entity] = {
            "rows_in": rows_in,
            "valid": len(outcome.valid),
            "quarantined": quarantined,
            "quarantine_rate": round(quarantined / rows_in, 6) if rows_in else 0.0,
            "max_quarantine_rate": mapping.quality.max_quarantine_rate.get(entity, options.max_quarantine_rate),
            "reasons": outcome.reason_counts,
            "evaluation": outcome.evaluation,
        }
        log.info("validated %s: %d valid, %d quarantined", entity, len(outcome.valid), quarantined)
    for entity, m in metrics.items():
        check_quarantine_rate(entity, m["rows_in"], m["quarantined"], m["reasons"], m["max_quarantine_rate"])
    return StageResult(stage="validate", artifacts=artifacts, metrics={"entities": metrics},
                       report_section=quality_section(metrics))
