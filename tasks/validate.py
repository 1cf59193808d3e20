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

from crm_analytics.artifacts import ArtifactRef, RunStore, StageResult
from crm_analytics.frames import lines_covered
from crm_analytics.mapping import EntitySource, SourceMapping, load_mapping, mapping_fingerprint
from crm_analytics.parameters import RunSpec, ValidationOptions
from crm_analytics.partitions import partition_count_for, split_table_by_customer
from crm_analytics.privacy import ALWAYS_PERSONAL, pseudonym_key, pseudonymise
from crm_analytics.reporting import markdown_table
from crm_analytics.schema import ENTITIES, PARSE_ERRORS, QUARANTINE_REASON
from crm_analytics.settings import get_settings
from tasks.common import DataQualityError, stage_logger, stage_task
from tasks.identity import with_match_keys
from tasks.suites import (
    CROSS_CHECK_ROWS,
    REFERENCES,
    UNIQUENESS_EXPECTATIONS,
    Engine,
    compilable,
    cross_check,
    cross_check_positions,
    load_suite,
    origin_rows_passing,
    reason_of,
    row_failures,
    suite_parameters,
    with_value_sets,
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
AFTER_AS_OF = " is after the as-of date"  # the suites' reason for a date past the as-of date, after its column


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


class CascadeTally(NamedTuple):
    """What :func:`cascade_summary` counts of quarantined rows, mergeable over batches of an entity's rows."""

    taken: dict[str, tuple[int, pd.Index]]  # cascade reason -> rows it took (failing none of their own), their keys
    other: Counter  # reason -> rows of it that no cascade took
    other_rows: int  # rows that no cascade took


def _cascades(suite: dict[str, Any], parameters: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Cascade reason -> (the entity it refers to, the referring column)."""
    return {reason_of(e, parameters): (e["meta"][REFERENCES], e["kwargs"]["column"])
            for e in suite["expectations"] if (e.get("meta") or {}).get(CASCADE)}


def cascade_tally(outcome: ValidationOutcome, suite: dict[str, Any], parameters: dict[str, Any]) -> CascadeTally:
    """The rows and keys each cascade took in ``outcome``, and the other quarantined rows by reason."""
    rows = outcome.reason_rows or {}
    quarantined = len(outcome.quarantine)
    own = np.zeros(quarantined, dtype=bool)
    cascades = _cascades(suite, parameters)
    for reason, hit in rows.items():
        if reason not in cascades:
            own |= hit
    taken: dict[str, tuple[int, pd.Index]] = {}
    cascaded = np.zeros(quarantined, dtype=bool)
    for reason, (_, column) in cascades.items():
        took = rows.get(reason, np.zeros(quarantined, dtype=bool)) & ~own
        cascaded |= took
        taken[reason] = (int(took.sum()), pd.Index(outcome.quarantine[column][took].dropna().unique()))
    other = Counter({reason: int((hit & ~cascaded).sum()) for reason, hit in rows.items()})
    return CascadeTally(taken, other, int((~cascaded).sum()))


def merged_cascade_tallies(tallies: list[CascadeTally], reason_order: list[str]) -> CascadeTally:
    """The tally of the rows of all ``tallies`` (batches of one entity): rows add up, keys are the distinct keys
    of all batches; ``other`` lists its reasons in ``reason_order`` (the order one whole frame gives them)."""
    taken: dict[str, tuple[int, pd.Index]] = {}
    for tally in tallies:
        for reason, (rows, keys) in tally.taken.items():
            before_rows, before_keys = taken.get(reason, (0, pd.Index([])))
            taken[reason] = (before_rows + rows, before_keys.append(keys).unique() if len(keys) else before_keys)
    return CascadeTally(taken, in_reason_order(sum_counts(t.other for t in tallies), reason_order),
                        sum(t.other_rows for t in tallies))


def cascade_from_tally(tally: CascadeTally, suite: dict[str, Any], upstream: dict[str, ValidationOutcome],
                       parameters: dict[str, Any]) -> dict[str, Any]:
    """:func:`cascade_summary` of the rows ``tally`` counted."""
    summary: dict[str, Any] = {}
    for reason, (entity, _) in _cascades(suite, parameters).items():
        rows, keys = tally.taken.get(reason, (0, pd.Index([])))
        if not rows:
            continue
        source = upstream[entity]
        source_keys = source.quarantine[ENTITY_KEYS[entity]]
        causes = Counter({r: int(keys.isin(source_keys[hit].dropna().unique()).sum())
                          for r, hit in (source.reason_rows or {}).items()})
        summary[entity] = {"rows": rows, "keys": len(keys), "reasons": {r: n for r, n in causes.most_common() if n}}
    if not summary:
        return summary  # nothing cascaded: the reason counts say it all
    summary["other"] = {"rows": tally.other_rows, "reasons": {r: n for r, n in tally.other.most_common() if n}}
    return summary


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
    return cascade_from_tally(cascade_tally(outcome, suite, parameters), suite, upstream, parameters)


def sum_counts(counters: Any) -> Counter:
    """Counts added up, zeros kept (``Counter.__add__`` drops them), reasons in order of first appearance."""
    total: Counter = Counter()
    for counts in counters:
        for reason, count in counts.items():
            total[reason] += count
    return total


def in_reason_order(counts: Counter, reason_order: list[str]) -> Counter:
    """``counts`` with its reasons in ``reason_order`` (unlisted ones after, as they come): ``most_common`` breaks
    ties by this order, so batches list tied reasons as one whole frame would."""
    rank = {reason: i for i, reason in enumerate(reason_order)}
    return Counter(dict(sorted(counts.items(), key=lambda item: rank.get(item[0], len(rank)))))


def personal_columns(entities: Collection[str], mapping: SourceMapping) -> list[str]:
    """The columns no reason shows a value of. A column personal in one entity is personal in all: customer_id
    declared pii in customers (ids that are e-mail addresses) must not show in the reasons of the order lines
    that refer to it."""
    return sorted({column for entity in entities for column in mapping.source(entity).pii})


def validate_all(frames: dict[str, pd.DataFrame], mapping: SourceMapping, as_of: date,
                 options: ValidationOptions, personal: Collection[str] | None = None) -> dict[str, ValidationOutcome]:
    """Validate customers and products first, then order lines and labels against their keys; no IO.

    ``rows in = valid + quarantined`` holds per entity (an AssertionError otherwise). ``personal``: see
    :func:`personal_columns` (by default, those of the entities of ``frames``).
    """
    base = suite_parameters(as_of, options.earliest_date)
    personal = personal_columns(frames, mapping) if personal is None else personal
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


class BatchedValidation:
    """One entity validated batch by batch, with the verdicts, metrics and cross-check of ``validate_entity`` on
    the whole frame, holding one batch at a time: ``validate`` each batch in order, then ``summary``.

    Exact only for a row-wise suite: no uniqueness expectation (a row's verdict depends on its row alone) and no
    rows sharing a source line (baskets count each line once over all rows); it refuses either. Rows in, valid,
    quarantined, lines and reasons add up over the batches, the cascade's keys are merged as keys (one key in
    two batches counts once), and GX cross-checks once, at the end, the very rows it would sample of the whole
    frame (gathered from the batches as they pass: ``cross_check_positions``). A suite with expectations GX
    must evaluate itself (none of the order lines' today) runs GX on every batch.
    """

    def __init__(self, suite: dict[str, Any], parameters: dict[str, Any], rows: int, *,
                 engine: Engine = "compiled", cross_check_rows: int = CROSS_CHECK_ROWS,
                 personal: Collection[str] = (), upstream: dict[str, ValidationOutcome] | None = None,
                 shared_lines: bool = False):
        if any(e["type"] in UNIQUENESS_EXPECTATIONS for e in suite["expectations"]):
            raise ValueError(f"suite {suite['name']!r} checks uniqueness: its rows cannot be validated in batches")
        self.suite, self.rows = suite, rows
        self.parameters = with_value_sets(parameters)  # the known ids: converted to Arrow once, not per batch
        self.engine, self.cross_check_rows, self.personal = engine, cross_check_rows, personal
        self.upstream, self.shared_lines = upstream, shared_lines
        self.refers = any(REFERENCES in (e.get("meta") or {}) for e in suite["expectations"])
        self.sampled = cross_check_positions(rows, cross_check_rows) if engine == "compiled" else np.zeros(0, int)
        self.samples: list[pd.DataFrame] = []
        self.seen = 0
        self.summaries: list[EntitySummary] = []
        self.tallies: list[CascadeTally] = []
        self.reason_order: list[str] | None = None

    def validate(self, batch: pd.DataFrame) -> ValidationOutcome:
        """The next ``batch`` of rows validated (its ``reason_rows`` index its own quarantined rows)."""
        if self.shared_lines and self.summaries:
            raise ValueError(f"{self.suite['name']}: rows sharing source lines (baskets) are validated in one batch")
        batch = batch.reset_index(drop=True)
        outcome = validate_entity(batch, self.suite, self.parameters, self.engine, cross_check_rows=0,
                                  personal=self.personal)
        if len(batch) != len(outcome.valid) + len(outcome.quarantine):
            raise AssertionError(f"{self.suite['name']}: {len(batch)} rows in but {len(outcome.valid)} valid + "
                                 f"{len(outcome.quarantine)} quarantined")
        if self.reason_order is None:  # the order validate_entity lists reasons in: compiled, then GX's
            expectations = self.suite["expectations"]
            evaluated = ([e for e in expectations if compilable(e, batch)] if self.engine == "compiled" else [])
            evaluated += [e for e in expectations if e not in evaluated]
            self.reason_order = list(dict.fromkeys(reason_of(e, self.parameters) for e in evaluated))
        end = self.seen + len(batch)
        wanted = self.sampled[(self.sampled >= self.seen) & (self.sampled < end)]
        if len(wanted):  # labelled by position in the whole, as the whole frame's sample is
            self.samples.append(batch.take(wanted - self.seen).set_axis(pd.Index(wanted)))
        self.seen = end
        self.summaries.append(summarise(outcome, self.shared_lines))
        if self.refers:
            self.tallies.append(cascade_tally(outcome, self.suite, self.parameters))
        return outcome

    def summary(self) -> EntitySummary:
        """The whole entity's summary; cross-checks the compiled masks against GX on the sampled rows first."""
        if self.seen != self.rows:
            raise AssertionError(f"{self.suite['name']}: {self.seen} rows validated of {self.rows}")
        if not self.summaries:
            raise ValueError(f"{self.suite['name']}: no batch was validated (an empty table is one empty batch)")
        evaluation = dict(self.summaries[0].evaluation)
        if self.samples:
            sample = pd.concat(self.samples)
            self.samples = []
            compiled = [e for e in self.suite["expectations"] if compilable(e, sample)]
            evaluation["cross_checked_rows"] = cross_check(sample, self.suite, compiled, self.parameters, len(sample))
        order = self.reason_order or []
        counts = in_reason_order(sum_counts(s.reason_counts for s in self.summaries), order)
        earliest: dict[str, Any] = {}
        for summary in self.summaries:  # the earliest of each batch's earliest (NaT: a batch had no date)
            for column, value in summary.earliest.items():
                if column not in earliest or (not pd.isna(value) and (pd.isna(earliest[column])
                                                                      or value < earliest[column])):
                    earliest[column] = value
        cascade = None
        if self.refers:
            cascade = cascade_from_tally(merged_cascade_tallies(self.tallies, order), self.suite,
                                         self.upstream or {}, self.parameters)
        return EntitySummary(
            valid=sum(s.valid for s in self.summaries), quarantined=sum(s.quarantined for s in self.summaries),
            lines_in=sum(s.lines_in for s in self.summaries),
            lines_quarantined=sum(s.lines_quarantined for s in self.summaries),
            reason_counts={reason: count for reason, count in counts.most_common() if count},
            evaluation=evaluation, cascade=cascade, earliest=earliest)


def publishable(outcome: ValidationOutcome, source: EntitySource, key: bytes) -> ValidationOutcome:
    """An outcome (or a batch's) as written: the entity's personal columns replaced by their keyed pseudonyms
    (valid customers also get the pseudonyms of their normalised identity keys, see ``tasks.identity``); row by
    row, so a batch's rows are published as they would be in the whole frame."""
    return outcome._replace(valid=pseudonymise(with_match_keys(outcome.valid, source, key), source.pii, key),
                            quarantine=pseudonymise(outcome.quarantine, source.pii, key))


def publishable_outcomes(outcomes: dict[str, ValidationOutcome], mapping: SourceMapping,
                         key: bytes) -> dict[str, ValidationOutcome]:
    """The outcomes as written (:func:`publishable`)."""
    return {entity: publishable(outcome, mapping.source(entity), key) for entity, outcome in outcomes.items()}


class EntitySummary(NamedTuple):
    """What the metrics and the gate need of an entity's outcome, without its rows: from one outcome
    (:func:`summarise`) or merged over the batches of an entity validated in batches (:class:`BatchedValidation`)."""

    valid: int
    quarantined: int
    lines_in: int
    lines_quarantined: int
    reason_counts: dict[str, int]
    evaluation: dict[str, Any]
    cascade: dict[str, Any] | None
    # Column -> its earliest value among the quarantined rows, for each "<column> is after the as-of date" reason
    # (see before_all_data).
    earliest: dict[str, Any]


def summarise(outcome: ValidationOutcome, shared_lines: bool = False) -> EntitySummary:
    """``outcome``'s counts; ``shared_lines``: rows may share a source line (see ``lines_covered``)."""
    after = [reason.removesuffix(AFTER_AS_OF) for reason in outcome.reason_counts if reason.endswith(AFTER_AS_OF)]
    return EntitySummary(
        valid=len(outcome.valid), quarantined=len(outcome.quarantine),
        lines_in=lines_covered(outcome.valid, outcome.quarantine, shared_lines=shared_lines),
        lines_quarantined=lines_covered(outcome.quarantine, shared_lines=shared_lines),
        reason_counts=outcome.reason_counts, evaluation=outcome.evaluation, cascade=outcome.cascade,
        earliest={column: outcome.quarantine[column].min() for column in after
                  if column in outcome.quarantine.columns})


def _summary(entity: str, outcome: ValidationOutcome | EntitySummary, mapping: SourceMapping) -> EntitySummary:
    if isinstance(outcome, EntitySummary):
        return outcome
    return summarise(outcome, shared_lines=_shares_lines(mapping, entity))


def _shares_lines(mapping: SourceMapping, entity: str) -> bool:
    return mapping.source(entity).format == "baskets"  # a basket's items share its line


def validation_metrics(outcomes: dict[str, ValidationOutcome | EntitySummary], mapping: SourceMapping,
                       options: ValidationOptions) -> dict[str, dict[str, Any]]:
    """Per entity: rows in, valid, quarantined, rate, allowed rate, reasons, the cascade and the evaluation."""
    metrics = {}
    for entity, outcome in outcomes.items():
        summary = _summary(entity, outcome, mapping)
        valid, quarantined = summary.valid, summary.quarantined
        rows_in = valid + quarantined
        lines_in, lines_quarantined = summary.lines_in, summary.lines_quarantined
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
            "reasons": summary.reason_counts,
            **({"cascade": summary.cascade} if summary.cascade is not None else {}),
            "evaluation": summary.evaluation,
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


def before_all_data(outcomes: dict[str, ValidationOutcome | EntitySummary], as_of: date) -> str | None:
    """"the as-of date is before all the data" when every row of an entity is dated after it (a mistyped
    ``--as-of``): said plainly instead of as a 100 % quarantine."""
    for entity, outcome in outcomes.items():
        summary = outcome if isinstance(outcome, EntitySummary) else summarise(outcome)  # lines play no part
        rows = summary.valid + summary.quarantined
        for reason, count in summary.reason_counts.items():
            column = reason.removesuffix(AFTER_AS_OF)
            if rows and count == rows and reason.endswith(AFTER_AS_OF) and column in summary.earliest:
                earliest = summary.earliest[column]
                return (f"data-quality gate: the as-of date {as_of} is before all the data: every one of the "
                        f"{rows:,} {entity} rows has {column} after it (the earliest is {earliest.date()}); "
                        "choose a later as-of date")
    return None


def check_gates(outcomes: dict[str, ValidationOutcome | EntitySummary], mapping: SourceMapping,
                options: ValidationOptions, as_of: date | None = None,
                metrics: dict[str, dict[str, Any]] | None = None) -> None:
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
    (``crm_analytics.partitions``), so that clean and features can hold one part at a time; they are also
    validated a batch at a time (:func:`_validate_lines`), so this stage holds one batch of them, not the table.
    """
    log = stage_logger()
    store = run.store
    mapping = load_mapping(mapping_name)
    entities = [entity for entity in ENTITIES if entity in ingested.artifacts]
    personal = personal_columns(entities, mapping)
    key = pseudonym_key(run.data_root)
    frames = {entity: store.read_frame(ingested.ref(entity)) for entity in entities if entity != "order_lines"}
    outcomes = validate_all(frames, mapping, run.as_of, options, personal)  # the order lines refer to none of them
    del frames
    artifacts, results = {}, {}
    for entity in entities:
        if entity == "order_lines":
            lines = ingested.ref(entity)
            rows = store.table_rows(lines)
            # The part count must be known before the first line is written, so it is decided from the ingested
            # line count, not (as when the whole table was validated before writing) from the valid line count.
            # It differs only when the quarantined lines cross a multiple of lines_per_partition (one part more
            # than the valid lines alone would ask for); never fewer, so a part still holds at most about
            # lines_per_partition lines.
            partitions = partition_count_for(rows)
            batch_rows = get_settings().lines_per_partition
            parameters = {**suite_parameters(run.as_of, options.earliest_date), **referential_parameters(outcomes)}
            written, results[entity] = _validate_lines(store, lines, rows, mapping.source(entity), parameters,
                                                       outcomes, options, personal, key, batch_rows, partitions)
            artifacts.update(written)
        else:
            outcome = publishable(outcomes[entity], mapping.source(entity), key)
            artifacts[entity] = store.write_frame("validated", entity, outcome.valid)
            artifacts[f"quarantine_{entity}"] = store.write_frame("quarantine", entity, outcome.quarantine)
            results[entity] = outcomes[entity]
        log.info("validated %s: %d valid, %d quarantined", entity, artifacts[entity].rows,
                 artifacts[f"quarantine_{entity}"].rows)
    metrics = validation_metrics(results, mapping, options)
    check_gates(results, mapping, options, run.as_of, metrics)
    return StageResult(stage="validate", artifacts=artifacts, metrics={"entities": metrics},
                       report_section=quality_section(metrics))


def _validate_lines(store: RunStore, ingested: ArtifactRef, rows: int, source: EntitySource,
                    parameters: dict[str, Any],
                    upstream: dict[str, ValidationOutcome], options: ValidationOptions, personal: Collection[str],
                    key: bytes, batch_rows: int, partitions: int) -> tuple[dict[str, ArtifactRef], EntitySummary]:
    """Validate the ingested order lines (``rows`` of them) ``batch_rows`` rows at a time
    (:class:`BatchedValidation`) and write each batch as it comes: its valid lines appended to their parts of
    ``partitions`` customer parts, its quarantined
    lines to the quarantine table. The tables hold the rows the whole-table validation would write, in input
    order (each part: the input order filtered to the part). A basket export is validated in one batch."""
    shared = source.format == "baskets"  # a basket's items share their line, counted once over all rows
    batched = BatchedValidation(load_suite("order_lines"), parameters, rows,
                                engine=options.engine, cross_check_rows=options.cross_check_rows, personal=personal,
                                upstream=upstream, shared_lines=shared)
    with (store.partitioned_writer("validated", "order_lines", partitions=partitions) as valid_parts,
          store.table_writer("quarantine", "order_lines") as quarantined):
        for batch in [store.read_frame(ingested)] if shared else store.read_batches(ingested, batch_rows):
            outcome = publishable(batched.validate(batch), source, key)
            for index, piece in enumerate(split_table_by_customer(outcome.valid, partitions)):
                valid_parts.append(index, piece)
            quarantined.append(outcome.quarantine)
        summary = batched.summary()  # in the block: a failed cross-check writes neither table
    return {"order_lines": valid_parts.ref, "quarantine_order_lines": quarantined.ref}, summary
