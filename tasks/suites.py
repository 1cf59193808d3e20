"""Evaluate a Great Expectations suite on a DataFrame: which rows fail which expectation. ``row_failures`` (a
copy of a row takes its first copy's verdict) and ``origin_rows_passing`` are shared by validation and by
ingest's derived entities, which are built only from rows validation will keep.

The JSON suites in ``expectations/`` are the single source of truth. Two engines read them:

- ``gx``: Great Expectations 1.x itself (pandas engine, COMPLETE results). Correct for every expectation
  type, but GX computes each expectation through its metric graph: ~50 s and +3 GiB for ten checks on ten
  million rows, where the same checks as pandas masks take a few seconds.
- ``compiled`` (default): the row-level expectation types the suites use are translated into the vectorised
  masks that GX's own pandas metrics compute (same null handling, same comparison rules; see
  ``great_expectations/expectations/metrics/column_map_metrics``). Anything it does not translate exactly
  (another type, ``mostly``, ``row_condition``, datetime value sets, ...) goes to GX. Then, every run, GX
  evaluates the whole suite on a seeded sample of the rows and the compiled verdicts on that sample must be
  identical, so a translation that drifts from GX fails the run instead of quarantining the wrong rows.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.frames import first_copies
from crm_analytics.parameters import ValidationOptions, as_of_end
from crm_analytics.settings import get_settings
from tasks.common import PermanentError

Engine = Literal["compiled", "gx"]
Failures = dict[str, list]  # reason -> index labels of the rows failing it
SMALL_VALUE_SET = 1_000  # value sets up to this size go to GX as written
# GX's cost is per expectation and per value-set entry far more than per row: 5,000 sampled rows re-check
# every compiled expectation for a few seconds, whatever the size of the frame.
CROSS_CHECK_ROWS = 5_000
UNIQUENESS_EXPECTATIONS = {"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"}
REFERENCES = "references"  # expectation meta: the check is of a key of that entity (validated before this one)
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # "{earliest_date}" in a reason: that parameter's value


class SuiteError(PermanentError):
    """An expectation could not be evaluated (a misspelt column, a missing parameter), or the compiled
    evaluation disagrees with Great Expectations."""


def load_suite(entity: str, expectations_dir: Path | None = None) -> dict[str, Any]:
    path = (expectations_dir or get_settings().expectations_dir) / f"{entity}.json"
    if not path.exists():
        raise SuiteError(f"no expectation suite for {entity}: {path} does not exist")
    return json.loads(path.read_text())


def _shown(value: Any) -> str:
    """A parameter as a reason shows it: a midnight timestamp or a date as YYYY-MM-DD, anything else as text."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.date().isoformat()
    return value.isoformat() if isinstance(value, date) else str(value)


def reason_of(expectation: dict[str, Any], parameters: dict[str, Any] | None = None) -> str:
    """The expectation's ``meta.reason``, with ``{name}`` replaced by the run's scalar parameter ``name`` (e.g.
    "order_ts is before {earliest_date}"): one text per run, so reasons still group rows."""
    meta = expectation.get("meta") or {}
    reason = meta.get("reason") or f"{expectation['type']}({expectation['kwargs'].get('column', '')})"
    if not parameters or "{" not in reason:
        return reason

    def fill(match: re.Match) -> str:
        value = parameters.get(match[1])
        return _shown(value) if isinstance(value, str | int | float | date) else match[0]

    return PLACEHOLDER.sub(fill, reason)


def resolve(kwargs: dict[str, Any], parameters: dict[str, Any], suite_name: str, kind: str) -> dict[str, Any]:
    """Substitute ``{"$PARAMETER": name}`` placeholders, as GX does with ``expectation_parameters``."""
    resolved = {}
    for key, value in kwargs.items():
        if isinstance(value, dict) and "$PARAMETER" in value:
            name = value["$PARAMETER"]
            if name not in parameters:
                raise SuiteError(f"suite {suite_name!r}: {kind} needs parameter {name!r}, which the run does not "
                                 f"provide (it provides {sorted(parameters)})")
            value = parameters[name]
        resolved[key] = value
    return resolved


# ---- compiled engine: each returns the "unexpected" mask over all rows --------------------------------------
def _present(column: pd.Series) -> np.ndarray:
    return column.notna().to_numpy()


def _bound(value: Any, column: pd.Series) -> Any:
    # GX parses string bounds of datetime columns (dateutil); pandas' parser accepts the same ISO forms.
    if isinstance(value, str) and pd.api.types.is_datetime64_any_dtype(column.dtype):
        return pd.Timestamp(value)
    return value


def _between(column: pd.Series, kw: dict[str, Any]) -> np.ndarray:
    low, high = _bound(kw.get("min_value"), column), _bound(kw.get("max_value"), column)
    if low is None and high is None:
        raise ValueError("min_value and max_value cannot both be None")
    if low is not None and high is not None and low > high:
        raise ValueError("min_value cannot be greater than max_value")
    present = _present(column)
    values = column[present]
    inside = np.ones(len(values), dtype=bool)
    if low is not None:
        inside &= (values > low if kw.get("strict_min") else values >= low).to_numpy(dtype=bool)
    if high is not None:
        inside &= (values < high if kw.get("strict_max") else values <= high).to_numpy(dtype=bool)
    unexpected = np.zeros(len(column), dtype=bool)
    unexpected[present] = ~inside
    return unexpected


class ValueSet(list):
    """A large value set (a list, as GX takes it) that keeps its Arrow array once built: a table validated in
    batches converts its million known ids once, not once per batch (~0.3 s CPU a million)."""

    def __init__(self, values: Any):
        super().__init__(values)
        self._arrow: dict[pa.DataType, pa.Array] = {}

    def arrow(self, type: pa.DataType) -> pa.Array:
        if type not in self._arrow:
            self._arrow[type] = pa.array(self, type=type)
        return self._arrow[type]


def with_value_sets(parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` with each list longer than ``SMALL_VALUE_SET`` as a :class:`ValueSet` (the same values)."""
    return {name: ValueSet(value) if isinstance(value, list) and len(value) > SMALL_VALUE_SET else value
            for name, value in parameters.items()}


def _is_member(column: pd.Series, values: Any) -> np.ndarray:
    if isinstance(column.dtype, pd.StringDtype) and column.dtype.storage == "pyarrow":
        # pandas' arrow-string isin boxes every value of the set into a pyarrow scalar first: seconds for a
        # million known ids. The same membership test straight in pyarrow is several times faster.
        array = pa.array(column.array)
        try:
            value_set = (values.arrow(array.type) if isinstance(values, ValueSet)
                         else pa.array(list(values), type=array.type))
        except (TypeError, ValueError):  # pyarrow's ArrowTypeError / ArrowInvalid
            value_set = None  # a set of non-strings: pandas' own rules apply
        if value_set is not None:
            member = pc.is_in(array, value_set=value_set)
            return member.to_numpy(zero_copy_only=False).astype(bool, copy=False) & _present(column)
    return column.isin(list(values)).to_numpy(dtype=bool)


def _in_set(column: pd.Series, kw: dict[str, Any], *, member_fails: bool) -> np.ndarray:
    if kw.get("value_set") is None:  # GX: vacuously true
        return np.zeros(len(column), dtype=bool)
    member = _is_member(column, kw["value_set"])
    return _present(column) & (member if member_fails else ~member)


def _matches_regex(column: pd.Series, kw: dict[str, Any]) -> np.ndarray:
    present = _present(column)
    unexpected = np.zeros(len(column), dtype=bool)
    unexpected[present] = ~column[present].astype(str).str.contains(kw["regex"]).to_numpy(dtype=bool)
    return unexpected


def _unique(column: pd.Series, kw: dict[str, Any]) -> np.ndarray:
    present = _present(column)
    unexpected = np.zeros(len(column), dtype=bool)
    unexpected[present] = column[present].duplicated(keep=False).to_numpy()
    return unexpected


COLUMN_MASKS: dict[str, Callable[[pd.Series, dict[str, Any]], np.ndarray]] = {
    "expect_column_values_to_not_be_null": lambda column, kw: ~_present(column),
    "expect_column_values_to_be_null": lambda column, kw: _present(column),
    "expect_column_values_to_be_between": _between,
    "expect_column_values_to_be_in_set": lambda column, kw: _in_set(column, kw, member_fails=False),
    "expect_column_values_to_not_be_in_set": lambda column, kw: _in_set(column, kw, member_fails=True),
    "expect_column_values_to_match_regex": _matches_regex,
    "expect_column_values_to_be_unique": _unique,
}
# Keyword arguments that do not change which rows fail; any other (mostly, row_condition, ...) goes to GX.
NEUTRAL_KWARGS = {"column", "column_list", "min_value", "max_value", "strict_min", "strict_max", "value_set",
                  "regex", "result_format", "catch_exceptions", "include_config"}


def compound_unique_mask(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """GX's default ``ignore_row_if="all_values_are_missing"``: such rows neither fail nor count as copies."""
    considered = frame[columns].notna().any(axis=1).to_numpy()
    unexpected = np.zeros(len(frame), dtype=bool)
    unexpected[considered] = frame.loc[considered, columns].duplicated(keep=False).to_numpy()
    return unexpected


def compilable(expectation: dict[str, Any], frame: pd.DataFrame) -> bool:
    kwargs = expectation["kwargs"]
    if set(kwargs) - NEUTRAL_KWARGS:
        return False
    if expectation["type"] == "expect_compound_columns_to_be_unique":
        return all(c in frame.columns for c in kwargs.get("column_list", []))
    if expectation["type"] not in COLUMN_MASKS or kwargs.get("column") not in frame.columns:
        return False  # GX names a missing column better than we would
    # GX parses datetime value sets its own way
    return not (expectation["type"].endswith("in_set")
                and pd.api.types.is_datetime64_any_dtype(frame[kwargs["column"]]))


def compiled_mask(frame: pd.DataFrame, expectation: dict[str, Any], kwargs: dict[str, Any]) -> np.ndarray:
    if expectation["type"] == "expect_compound_columns_to_be_unique":
        return compound_unique_mask(frame, list(kwargs["column_list"]))
    return COLUMN_MASKS[expectation["type"]](frame[kwargs["column"]], kwargs)


def run_compiled(frame: pd.DataFrame, suite: dict[str, Any], expectations: list[dict[str, Any]],
                 parameters: dict[str, Any]) -> Failures:
    failures: Failures = {}
    for expectation in expectations:
        kwargs = resolve(expectation["kwargs"], parameters, suite["name"], expectation["type"])
        try:
            unexpected = compiled_mask(frame, expectation, kwargs)
        except (TypeError, ValueError) as exc:
            raise SuiteError(f"suite {suite['name']!r}: {expectation['type']} on {kwargs.get('column')!r} could "
                             f"not run: {exc}") from exc
        if unexpected.any():
            failures.setdefault(reason_of(expectation, parameters), []).extend(frame.index[unexpected].tolist())
    return failures


# ---- Great Expectations engine ------------------------------------------------------------------------------
def shrink_value_sets(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """The suite with its large value sets resolved inline and cut to the values that occur in ``frame``.

    GX copies an expectation's whole configuration for every keyword of every metric it plans, so its cost
    grows with the size of a value set (a million known customer ids: minutes, whatever the row count).
    A value that does not occur in the column cannot change any row's verdict, so the cut is exact.
    """
    expectations = []
    for expectation in suite["expectations"]:
        kwargs = expectation["kwargs"]
        if "value_set" in kwargs and kwargs.get("column") in frame.columns:
            values = resolve({"value_set": kwargs["value_set"]}, parameters, suite["name"],
                             expectation["type"])["value_set"]
            if values is not None and len(values) > SMALL_VALUE_SET:
                present = frame[kwargs["column"]].dropna().drop_duplicates()
                kept = present[_is_member(present, values)]
                expectation = {**expectation, "kwargs": {**kwargs, "value_set": kept.tolist()}}
        expectations.append(expectation)
    return {**suite, "expectations": expectations}


def run_gx(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any]) -> Failures:
    """Evaluate ``suite`` with Great Expectations itself; returns reason -> index labels of failing rows."""
    if not suite["expectations"]:
        return {}
    suite = shrink_value_sets(frame, suite, parameters)
    import great_expectations as gx  # heavy import, only where it is used
    from great_expectations.core import ExpectationSuite

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    gx_suite = context.suites.add(ExpectationSuite(**suite))
    asset = context.data_sources.add_pandas("pipeline").add_dataframe_asset(suite["name"])
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    results = batch.validate(gx_suite, result_format={"result_format": "COMPLETE"},
                             expectation_parameters=parameters)
    failures: Failures = {}
    for result in results.results:  # not in suite order: identify each by its own configuration
        config = result.expectation_config
        error = _raised(result.exception_info)
        if error:
            raise SuiteError(f"suite {suite['name']!r}: {config.type} on {config.kwargs.get('column')!r} "
                             f"could not run: {error}")
        if not result.success:
            reason = reason_of({"type": config.type, "kwargs": config.kwargs, "meta": config.meta}, parameters)
            failures.setdefault(reason, []).extend(result.result.get("unexpected_index_list") or [])
    return failures


def _raised(info: dict[str, Any] | None) -> str | None:
    """GX reports an expectation's own error flat, but a failed metric (e.g. a misspelt column) nested under the
    metric's id, with ``success`` False and no failing rows: both must stop the run, not pass silently."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info["raised_exception"] else None
    messages = [nested.get("exception_message") for nested in info.values()
                if isinstance(nested, dict) and nested.get("raised_exception")]
    return "; ".join(str(m) for m in messages) or None


def _merge(*parts: Failures) -> Failures:
    merged: Failures = {}
    for part in parts:
        for reason, labels in part.items():
            merged.setdefault(reason, []).extend(labels)
    return merged


def _as_sets(failures: Failures) -> dict[str, set]:
    return {reason: set(labels) for reason, labels in failures.items() if labels}


def cross_check_positions(rows: int, sample_rows: int, seed: int = 0) -> np.ndarray:
    """Which rows (sorted positions) ``cross_check`` samples of a frame of ``rows`` rows: all of them when there are
    no more than ``sample_rows``. A caller validating a frame in batches gathers these rows from its batches."""
    if sample_rows <= 0:
        return np.zeros(0, dtype=np.int64)
    if rows <= sample_rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=sample_rows, replace=False))


def cross_check(frame: pd.DataFrame, suite: dict[str, Any], compiled: list[dict[str, Any]],
                parameters: dict[str, Any], sample_rows: int, seed: int = 0) -> int:
    """GX and the compiled masks on the same seeded sample must fail exactly the same rows for the same reasons.

    Uniqueness is a property of the sample there, so both engines judge the sample alone. Returns the
    number of rows checked.
    """
    if not compiled or sample_rows <= 0 or frame.empty:
        return 0
    sample = frame
    if len(frame) > sample_rows:  # positional take: DataFrame.sample copies the frame's index machinery first
        sample = frame.take(cross_check_positions(len(frame), sample_rows, seed))
    sub_suite = {**suite, "expectations": compiled}
    ours, theirs = _as_sets(run_compiled(sample, sub_suite, compiled, parameters)), _as_sets(
        run_gx(sample, sub_suite, parameters))
    if ours != theirs:
        diffs = []
        for reason in sorted(set(ours) | set(theirs)):
            only_ours, only_gx = ours.get(reason, set()) - theirs.get(reason, set()), theirs.get(
                reason, set()) - ours.get(reason, set())
            if only_ours or only_gx:
                diffs.append(f"{reason!r}: {len(only_ours)} rows failed only by the compiled masks "
                             f"(e.g. {sorted(only_ours, key=str)[:3]}), {len(only_gx)} only by GX "
                             f"(e.g. {sorted(only_gx, key=str)[:3]})")
        raise SuiteError(f"suite {suite['name']!r}: the compiled evaluation disagrees with Great Expectations on "
                         f"a sample of {len(sample)} rows: " + "; ".join(diffs)
                         + ". Run with validation engine 'gx' and report this as a bug.")
    return len(sample)


def evaluate_suite(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any], engine: Engine = "compiled",
                   cross_check_rows: int = CROSS_CHECK_ROWS) -> tuple[Failures, dict[str, Any]]:
    """Failing rows per reason, and how they were found (which expectations each engine evaluated)."""
    if engine == "gx":
        return run_gx(frame, suite, parameters), {"engine": "gx", "gx_expectations": len(suite["expectations"])}
    compiled = [e for e in suite["expectations"] if compilable(e, frame)]
    residual = [e for e in suite["expectations"] if not compilable(e, frame)]
    failures = _merge(run_compiled(frame, suite, compiled, parameters),
                      run_gx(frame, {**suite, "expectations": residual}, parameters))
    checked = cross_check(frame, suite, compiled, parameters, cross_check_rows)
    return failures, {"engine": "compiled", "compiled_expectations": len(compiled),
                      "gx_expectations": len(residual), "cross_checked_rows": checked}


# ---- rows of a frame against its entity's suite (validation, and ingest's derived entities) -------------------
def suite_parameters(as_of: date, earliest_date: date | None = None, **extra: Any) -> dict[str, Any]:
    """Values for the ``$PARAMETER`` placeholders in the suites (no key is quarantined upstream unless given)."""
    earliest = earliest_date or ValidationOptions.model_fields["earliest_date"].default
    if earliest > as_of:
        raise PermanentError(f"validation.earliest_date {earliest} is after the as-of date {as_of}: every dated row "
                             "would be quarantined; choose a later as-of date or an earlier validation.earliest_date")
    return {"as_of_end": as_of_end(as_of), "as_of_year": as_of.year,
            "earliest_date": pd.Timestamp(earliest, tz="UTC"),
            "quarantined_customer_ids": [], "quarantined_product_ids": [], **extra}


def row_failures(frame: pd.DataFrame, suite: dict[str, Any], parameters: dict[str, Any], engine: Engine = "compiled",
                 cross_check_rows: int = CROSS_CHECK_ROWS) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per reason, the boolean mask of the rows of ``frame`` (positions) failing it, and how it was evaluated.

    Uniqueness is judged on distinct rows: an exact duplicate is not a conflicting key (the clean stage
    drops it and counts it); it gets the verdict of its first copy (``crm_analytics.frames.first_copies``).
    """
    frame = frame.reset_index(drop=True)
    data_columns = [c for c in frame.columns if not c.startswith("_")]
    if any(e["type"] in UNIQUENESS_EXPECTATIONS for e in suite["expectations"]):
        representative = first_copies(frame, data_columns)  # exact: a hash collision merges no rows
        first = representative == np.arange(len(frame))
        checked = frame if first.all() else frame[first]  # no copies (the usual case): no copy of the frame
    else:
        representative = frame.index.to_numpy()
        checked = frame
    failures, evaluation = evaluate_suite(checked, suite, parameters, engine, cross_check_rows)
    masks = {}
    for reason, labels in failures.items():  # labels are positions after reset_index
        hit = np.zeros(len(frame), dtype=bool)
        hit[np.asarray(labels, dtype=np.int64)] = True
        masks[reason] = hit[representative]  # every row takes the verdict of its representative copy
    return masks, evaluation


def origin_rows_passing(frame: pd.DataFrame, entity: str, as_of: date,
                        earliest_date: date | None = None) -> np.ndarray:
    """Rows of ``entity`` that pass its suite's own checks (not those against other entities): the rows an
    entity derived from it may be built from. Compiled engine, no GX cross-check (validation does that later)."""
    suite = load_suite(entity)
    own = [e for e in suite["expectations"] if REFERENCES not in (e.get("meta") or {})]
    masks, _ = row_failures(frame, {**suite, "expectations": own}, suite_parameters(as_of, earliest_date),
                            cross_check_rows=0)
    failed = np.zeros(len(frame), dtype=bool)
    for hit in masks.values():
        failed |= hit
    return ~failed
