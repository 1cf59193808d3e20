"""Validate: run the Great Expectations suite of each entity and split its rows into valid and quarantined.

The suites in ``expectations/`` are the single source of truth for what a valid row is. Every ingested row
ends up in exactly one of ``validated/<entity>.parquet`` or ``quarantine/<entity>.parquet`` (with the
reasons it failed, each with the offending value unless the column is personal, and its source file and line),
so ``rows in = valid + quarantined`` always holds.

Order lines and labels are checked against the customers and products validated before them. A key that no
row lists is unknown; a key whose row was quarantined takes the referring rows with it (the cascade), and the
metrics, the report and the gate's message say how many rows each upstream cause took.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Collection
from datetime import date
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from crm_analytics.artifacts import StageResult
from crm_analytics.frames import lines_covered
from crm_analytics.mapping import SourceMapping, load_mapping, mapping_fingerprint
from crm_analytics.parameters import RunSpec, ValidationOptions
from crm_analytics.partitions import partition_count_for, split_table_by_customer
from crm_analytics.privacy import ALWAYS_PERSONAL, pseudonym_key, pseudonymise
from crm_analytics.reporting import markdown_table
from crm_analytics.schema import ENTITIES, PARSE_ERRORS, QUARANTINE_REASON
from tasks.common import DataQualityError, stage_logger, stage_task
from tasks.identity import with_match_keys
from tasks.suites import (
    CROSS_CHECK_ROWS,
    REFERENCES,
    Engine,
    load_suite,
    origin_rows_passing,
    reason_of,
    row_failures,
    suite_parameters,
)

__all__ = ["ValidationOutcome", "cascade_summary", "check_gates", "check_quarantine_rate", "gate_failure",
           "load_suite", "origin_rows_passing", "publishable_outcomes", "suite_parameters", "validate", "validate_all",
           "validate_entity", "validation_metrics"]

# Expectations whose failing rows are reported with their value: the value is what is wrong with them. Null
# checks have no value to show, and a uniqueness failure is about other rows too.
VALUE_EXPECTATIONS = {"expect_column_values_to_be_between", "expect_column_values_to_be_in_set",
                      "expect_column_values_to_not_be_in_set", "expect_column_values_to_match_regex"}
SHOWN_CHARACTERS = 40
CASCADE = "cascade"  # expectation meta: a failure quarantines the rows referring to this key (see REFERENCES)
ENTITY_KEYS = {"customers": "customer_id", "products": "product_id"}
ROW_NOUNS = {"order_lines": "lines", "churn_labels": "labels"}


class ValidationOutcome(NamedTuple):
    valid: pd.DataFrame
    quarantine: pd.DataFrame
    reason_counts: dict[str, int]  # by the suite's reason, without values: rows that failed it
    evaluation: dict[str, Any]
    # Per reason, which quarantined rows (positions in ``quarantine``) failed it.
    reason_rows: dict[str, np.ndarray] | None = None
    cascade: dict[str, Any] | None = None  # see cascade_summary; None for an entity that refers to none


# ---- pure core ------------------------------------------------------------------------------------------
def shown_value(value: Any) -> str:
    """A failing value as a reason shows it: text quoted and cut short, numbers and times as written."""
    if isinstance(value, str):
        return repr(value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS] + "...")
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)


def _value_columns(suite: dict[str, Any], parameters: dict[str, Any], personal: Collection[str]) -> dict[str, str]:
    """Reason -> the column whose value its rows show (one column per reason; personal columns never)."""
    columns: dict[str, set[str | None]] = {}
    for expectation in suite["expectations"]:
        column = expectation["kwargs"].get("column")
        if expectation["type"] not in VALUE_EXPECTATIONS and column != PARSE_ERRORS:
            column = None
        columns.setdefault(reason_of(expectation, parameters), set()).add(column)
    hidden = {*personal, *ALWAYS_PERSONAL}  # e-mail addresses are never shown, even where not declared personal
    return {reason: next(iter(c)) for reason, c in columns.items()
            if len(c) == 1 and None not in c and next(iter(c)) not in hidden}


def validate_entity(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any],
                    engine: Engine = "compiled", cross_check_rows: int = CROSS_CHECK_ROWS,
                    personal: Collection[str] = ()) -> ValidationOutcome:
    """Split ``frame`` into valid rows and quarantined rows (with ``_quarantine_reason``).

    A reason about a value carries it, e.g. "order_ts is before 1990-01-01 (value 1850-03-01 00:00:00+00:00)",
    except for the ``personal`` columns and ``email``; ``reason_counts`` counts rows by the reason alone.
    """
    frame = frame.reset_index(drop=True)
    masks, evaluation = row_failures(frame, suite, parameters, engine, cross_check_rows)
    shown = _value_columns(suite, parameters, personal)
    reason_text = np.full(len(frame), "", dtype=object)
    for reason, hit in masks.items():
        text: Any = reason
        if reason in shown and shown[reason] == PARSE_ERRORS:  # ingest wrote it, personal values redacted
            text = (reason + ": " + frame[PARSE_ERRORS][hit].astype(object)).to_numpy()
        elif reason in shown:
            text = (reason + " (value " + frame[shown[reason]][hit].map(shown_value).astype(object) + ")").to_numpy()
        previous = reason_text[hit]
        reason_text[hit] = np.where(previous == "", text, previous + "; " + text)
    failed = reason_text != ""
    quarantine = frame[failed].assign(**{QUARANTINE_REASON: pd.array(reason_text[failed], dtype="string")})
    valid = frame[~failed].drop(columns=[PARSE_ERRORS], errors="ignore").reset_index(drop=True)
    counts = Counter({reason: int(hit.sum()) for reason, hit in masks.items()})
    return ValidationOutcome(valid, quarantine.reset_index(drop=True), dict(counts.most_common()), evaluation,
                             {reason: hit[failed] for reason, hit in masks.items()})


def referential_parameters(outcomes: dict[str, ValidationOutcome]) -> dict[str, list]:
    """The keys order lines and labels are checked against: every key the customers (products) list, and those
    whose rows were all quarantined there."""
    parameters = {}
    for entity, key in ENTITY_KEYS.items():
        singular = entity[:-1]
        outcome = outcomes.get(entity)
        if outcome is None:
            parameters[f"known_{singular}_ids"], parameters[f"quarantined_{singular}_ids"] = [], []
            continue
        valid = pd.Index(outcome.valid[key].dropna().unique())
        quarantined = pd.Index(outcome.quarantine[key].dropna().unique()).difference(valid)
        parameters[f"known_{singular}_ids"] = valid.append(quarantined).tolist()
        parameters[f"quarantined_{singular}_ids"] = quarantined.tolist()
    return parameters


def cascade_summary(outcome: ValidationOutcome, suite: dict[str, Any], upstream: dict[str, ValidationOutcome],
                    parameters: dict[str, Any]) -> dict[str, Any]:
    """How many quarantined rows each upstream entity's quarantine took, and what else quarantined rows.

    ``{"customers": {"rows": 76, "keys": 4, "reasons": {"birth_year is implausible": 3, ...}}, ...,
    "other": {"rows": 4, "reasons": {...}}}``: a row counts for an upstream entity when its key's row is
    quarantined there and it fails none of its own checks (it would be valid otherwise); ``keys`` is how many
    distinct upstream rows took them, ``reasons`` how many of those keys were quarantined for each reason (a
    key with two reasons counts in both). ``other`` is every other quarantined row, by its reasons. Empty when
    no upstream quarantine took any row.
    """
    rows = outcome.reason_rows or {}
    cascades = {reason_of(e, parameters): (e["meta"][REFERENCES], e["kwargs"]["column"])
                for e in suite["expectations"] if (e.get("meta") or {}).get(CASCADE)}
    quarantined = len(outcome.quarantine)
    own = np.zeros(quarantined, dtype=bool)
    for reason, hit in rows.items():
        if reason not in cascades:
            own |= hit
    summary: dict[str, Any] = {}
    cascaded = np.zeros(quarantined, dtype=bool)
    for reason, (entity, column) in cascades.items():
        taken = rows.get(reason, np.zeros(quarantined, dtype=bool)) & ~own
        if not taken.any():
            continue
        cascaded |= taken
        keys = pd.Index(outcome.quarantine[column][taken].dropna().unique())
        source = upstream[entity]
        source_keys = source.quarantine[ENTITY_KEYS[entity]]
        causes = Counter({r: int(keys.isin(source_keys[hit].dropna().unique()).sum())
                          for r, hit in (source.reason_rows or {}).items()})
        summary[entity] = {"rows": int(taken.sum()), "keys": len(keys),
                           "reasons": {r: n for r, n in causes.most_common() if n}}
    if not summary:
        return summary  # nothing cascaded: the reason counts say it all
    other = Counter({reason: int((hit & ~cascaded).sum()) for reason, hit in rows.items()})
    summary["other"] = {"rows": int((~cascaded).sum()), "reasons": {r: n for r, n in other.most_common() if n}}
    return summary


def validate_all(frames: dict[str, pd.DataFrame], mapping: SourceMapping, as_of: date,
                 options: ValidationOptions) -> dict[str, ValidationOutcome]:
    """Validate customers and products first, then order lines and labels against their keys; no IO.

    ``rows in = valid + quarantined`` holds per entity (an AssertionError otherwise).
    """
    base = suite_parameters(as_of, options.earliest_date)
    # A column personal in one entity is personal in all: customer_id declared pii in customers (ids that are
    # e-mail addresses) must not show in the reasons of the order lines that refer to it.
    personal = sorted({column for entity in frames for column in mapping.source(entity).pii})
    outcomes: dict[str, ValidationOutcome] = {}
    for entity in [e for e in ENTITIES if e in frames]:
        frame, suite = frames[entity], load_suite(entity)
        refers = any(REFERENCES in (e.get("meta") or {}) for e in suite["expectations"])
        parameters = {**base, **referential_parameters(outcomes)} if refers else base
        outcome = validate_entity(frame, suite, parameters, options.engine, options.cross_check_rows,
                                  personal=personal)
        if refers:
            outcome = outcome._replace(cascade=cascade_summary(outcome, suite, outcomes, parameters))
        if len(frame) != len(outcome.valid) + len(outcome.quarantine):
            raise AssertionError(f"{entity}: {len(frame)} rows in but {len(outcome.valid)} valid + "
                                 f"{len(outcome.quarantine)} quarantined")
        outcomes[entity] = outcome
    return outcomes


def publishable_outcomes(outcomes: dict[str, ValidationOutcome], mapping: SourceMapping,
                         key: bytes) -> dict[str, ValidationOutcome]:
    """The outcomes as written: each entity's personal columns replaced by their keyed pseudonyms (valid customers
    also get the pseudonyms of their normalised identity keys, see ``tasks.identity``)."""
    return {entity: outcome._replace(valid=pseudonymise(with_match_keys(outcome.valid, mapping.source(entity), key),
                                                        mapping.source(entity).pii, key),
                                     quarantine=pseudonymise(outcome.quarantine, mapping.source(entity).pii, key))
            for entity, outcome in outcomes.items()}


def validation_metrics(outcomes: dict[str, ValidationOutcome], mapping: SourceMapping,
                       options: ValidationOptions) -> dict[str, dict[str, Any]]:
    """Per entity: rows in, valid, quarantined, rate, allowed rate, reasons, the cascade and the evaluation."""
    metrics = {}
    for entity, outcome in outcomes.items():
        valid, quarantined = len(outcome.valid), len(outcome.quarantine)
        rows_in = valid + quarantined
        shared = mapping.source(entity).format == "baskets"  # a basket's items share its line
        lines_in = lines_covered(outcome.valid, outcome.quarantine, shared_lines=shared)
        lines_quarantined = lines_covered(outcome.quarantine, shared_lines=shared)
        metrics[entity] = {
            "rows_in": rows_in,
            "valid": valid,
            "quarantined": quarantined,
            "lines_in": lines_in,
            "lines_quarantined": lines_quarantined,
            # The gate judges lines as well as rows: one row merged from many lines (an unbalanced quote running
            # to the end of the file) is one quarantined row but most of the file.
            "quarantine_rate": round(max(quarantined / rows_in if rows_in else 0.0,
                                         lines_quarantined / lines_in if lines_in else 0.0), 6),
            "max_quarantine_rate": mapping.quality.max_quarantine_rate.get(entity, options.max_quarantine_rate),
            "reasons": outcome.reason_counts,
            **({"cascade": outcome.cascade} if outcome.cascade is not None else {}),
            "evaluation": outcome.evaluation,
        }
    return metrics


def _keys(upstream: str, taken: dict[str, Any]) -> str:
    """"4 customers", "1 customer": the upstream rows a cascade came from."""
    return f"{taken['keys']:,} {upstream if taken['keys'] != 1 else upstream[:-1]}"


def _counted(counts: dict[str, int], top: int = 3) -> str:
    return ", ".join(f"{reason} ({count:,})" for reason, count in list(counts.items())[:top])


def cascade_causes(entity: str, cascade: dict[str, Any] | None) -> list[str]:
    """One phrase per upstream cause, e.g. "76 lines of 4 customers quarantined for birth_year is implausible (3)"."""
    noun = ROW_NOUNS.get(entity, "rows")
    phrases = []
    for upstream, taken in (cascade or {}).items():
        if upstream == "other":
            continue
        phrases.append(f"{taken['rows']:,} {noun} of {_keys(upstream, taken)} quarantined for "
                       f"{_counted(taken['reasons'])}")
    return phrases


def gate_failure(entity: str, rows_in: int, quarantined: int, reason_counts: dict[str, int], max_rate: float,
                 cascade: dict[str, Any] | None = None, lines: tuple[int, int] | None = None) -> str | None:
    """What the gate says of one entity over ``max_rate`` (its rate, then the rows each quarantined upstream key
    took — ``cascade``, see :func:`cascade_summary` — and the top reasons); ``None`` within the limit.
    ``lines`` (lines in, lines quarantined) is judged too, and named when its rate is the higher one."""
    rate = quarantined / rows_in if rows_in else 0.0
    unit = "rows"
    if lines is not None and lines[0] and lines[1] / lines[0] > rate:
        (rows_in, quarantined), rate, unit = lines, lines[1] / lines[0], "lines"
    if rate <= max_rate:
        return None
    head = f"{entity} quarantined {quarantined:,} of {rows_in:,} {unit} ({rate:.1%} > {max_rate:.1%} allowed)"
    causes = []
    for upstream, taken in (cascade or {}).items():
        if upstream != "other":
            causes.append(f"{taken['rows']:,} because their {upstream[:-1]} is quarantined "
                          f"({_keys(upstream, taken)}: {_counted(taken['reasons'])})")
    if causes:
        other = cascade["other"]
        if other["rows"]:
            causes.append(f"{other['rows']:,} other: {_counted(other['reasons'])}")
        return f"{head}: " + ", ".join(causes)
    return f"{head}; top reasons: {_counted(reason_counts)}"


def _gate_error(failures: list[tuple[str, str]]) -> DataQualityError:
    entities = " and ".join(f"quarantine/{entity}.parquet" for entity, _ in failures)
    return DataQualityError("data-quality gate: " + "; ".join(text for _, text in failures)
                            + f". No model was retrained; see {entities}")


def check_quarantine_rate(entity: str, rows_in: int, quarantined: int, reason_counts: dict[str, int],
                          max_rate: float, cascade: dict[str, Any] | None = None) -> float:
    """Raise :class:`DataQualityError` naming the entity, its rate and its causes when over ``max_rate``."""
    if (text := gate_failure(entity, rows_in, quarantined, reason_counts, max_rate, cascade)) is not None:
        raise _gate_error([(entity, text)])
    return quarantined / rows_in if rows_in else 0.0


AFTER_AS_OF = " is after the as-of date"  # the suites' reason for a date past the as-of date, after its column


def before_all_data(outcomes: dict[str, ValidationOutcome], as_of: date) -> str | None:
    """"the as-of date is before all the data" when every row of an entity is dated after it (a mistyped
    ``--as-of``): said plainly instead of as a 100 % quarantine."""
    for entity, outcome in outcomes.items():
        rows = len(outcome.valid) + len(outcome.quarantine)
        for reason, count in outcome.reason_counts.items():
            column = reason.removesuffix(AFTER_AS_OF)
            if rows and count == rows and reason.endswith(AFTER_AS_OF) and column in outcome.quarantine.columns:
                earliest = outcome.quarantine[column].min()
                return (f"data-quality gate: the as-of date {as_of} is before all the data: every one of the "
                        f"{rows:,} {entity} rows has {column} after it (the earliest is {earliest.date()}); "
                        "choose a later as-of date")
    return None


def check_gates(outcomes: dict[str, ValidationOutcome], mapping: SourceMapping, options: ValidationOptions,
                as_of: date | None = None, metrics: dict[str, dict[str, Any]] | None = None) -> None:
    """The data-quality gate: every entity over its allowed rate is named in one line, so a cascade from
    quarantined customers is told together with the customers' own reasons. ``metrics``: the outcomes'
    :func:`validation_metrics` when the caller has them already."""
    if as_of is not None and (text := before_all_data(outcomes, as_of)) is not None:
        raise DataQualityError(text)
    metrics = metrics if metrics is not None else validation_metrics(outcomes, mapping, options)
    failures = [(entity, text) for entity, m in metrics.items()
                if (text := gate_failure(entity, m["rows_in"], m["quarantined"], m["reasons"],
                                         m["max_quarantine_rate"], m.get("cascade"),
                                         (m["lines_in"], m["lines_quarantined"]))) is not None]
    if failures:
        raise _gate_error(failures)


def quality_section(metrics: dict[str, dict[str, Any]]) -> str:
    rows = pd.DataFrame([
        {"entity": entity, "rows in": m["rows_in"], "valid": m["valid"], "quarantined": m["quarantined"],
         "rate": f"{m['quarantine_rate']:.2%}",
         "top reasons": "; ".join(f"{r} ({n})" for r, n in list(m["reasons"].items())[:3]) or "-"}
        for entity, m in metrics.items()
    ])
    section = "## Data quality\n\n" + markdown_table(rows)
    cascades = [f"- {entity}: " + "; ".join(phrases) + " (rows that fail none of their own checks)"
                for entity, m in metrics.items() if (phrases := cascade_causes(entity, m.get("cascade")))]
    if cascades:
        section += ("\n\nQuarantined because the customer or product they refer to is quarantined:\n\n"
                    + "\n".join(cascades))
    return section


# ---- IO edge ------------------------------------------------------------------------------------------------
def _validate_fingerprint(run: RunSpec, mapping_name: str, **_: Any) -> str:
    # The mapping (pii, gates) and the pseudonym key shape the outputs; the key enters only as an HMAC.
    probe = hmac.new(pseudonym_key(run.data_root), b"fingerprint", hashlib.sha256).hexdigest()[:16]
    return f"{mapping_fingerprint(mapping_name)}:{probe}"


@stage_task("validate", fingerprint_extra=_validate_fingerprint)
def validate(run: RunSpec, ingested: StageResult, options: ValidationOptions, mapping_name: str) -> StageResult:
    """Validate every ingested entity (:func:`validate_all`), write the rows pseudonymised, then apply the gate.

    Personal columns are pseudonymised in everything this stage writes (validated and quarantined rows);
    the raw values stay in ``raw/`` only. The valid order lines are written split by customer
    (``crm_analytics.partitions``), so that clean and features can hold one part at a time.
    """
    log = stage_logger()
    store = run.store
    mapping = load_mapping(mapping_name)
    frames = {entity: store.read_frame(ingested.ref(entity)) for entity in ENTITIES if entity in ingested.artifacts}
    outcomes = validate_all(frames, mapping, run.as_of, options)
    artifacts = {}
    for entity, outcome in publishable_outcomes(outcomes, mapping, pseudonym_key(run.data_root)).items():
        artifacts[entity] = (store.write_frame("validated", entity, outcome.valid) if entity != "order_lines" else
                             store.write_partitioned("validated", entity, split_table_by_customer(
                                 outcome.valid, partition_count_for(len(outcome.valid)))))
        artifacts[f"quarantine_{entity}"] = store.write_frame("quarantine", entity, outcome.quarantine)
        log.info("validated %s: %d valid, %d quarantined", entity, len(outcome.valid), len(outcome.quarantine))
    metrics = validation_metrics(outcomes, mapping, options)
    check_gates(outcomes, mapping, options, run.as_of, metrics)
    return StageResult(stage="validate", artifacts=artifacts, metrics={"entities": metrics},
                       report_section=quality_section(metrics))
