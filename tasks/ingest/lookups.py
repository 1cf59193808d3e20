"""Lookups: columns an entity takes from another table by key (an order line's customer and date from its order
header, a product's category name from the category table), many rows to one.

Why a lookup and not a SQL join: a join multiplies a row whose key its table lists twice, and drops (inner) or
silently empties (left) a row whose key it lacks. Here each row's key is looked up among the table's keys
that occur exactly once (Arrow's hash kernel, ``pyarrow.compute.index_in``), so a row gets one match or none
by construction; a row without a match keeps its place, its lineage (the main table's file and line) and its
line count, with the reason in ``_parse_errors`` naming the key and the table ("no order header '10248' in
orders.csv", "order header '10250' is not unique in orders.csv (lines 4, 9)"), and validation quarantines it.
The tables are read by the same readers as every entity (encodings, line counts, damaged rows), and a row of the
table that a reader flagged (a wrong field count) is no match either: its values cannot be trusted.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.mapping import DatabaseSpec, EntitySource, Lookup, select_files
from crm_analytics.schema import PARSE_ERRORS, SOURCE_FILE, SOURCE_LINE
from tasks.common import SourceSchemaError
from tasks.ingest.columns import find_column, shown_columns
from tasks.ingest.history import file_states, only_appended
from tasks.ingest.parse import normalised_text
from tasks.ingest.readers import read_source_text

__all__ = ["LookupTable", "KEY_SEPARATOR", "attach_lookups", "lookup_problem_rows", "look_up", "lookups_reusable",
           "read_lookup_tables", "repeated_keys"]

KEY_SEPARATOR = "\x1f"  # between the parts of a compound key (a byte no export's ids hold)
SHOWN_LINES = 5  # lines of a duplicated key a message lists
SHOWN_KEY = 40


class LookupTable(NamedTuple):
    """One lookup's table as text (its key and value columns, with lineage) and the files it came from."""

    lookup: Lookup
    text: pd.DataFrame
    files: dict[str, list[int]]  # path -> [size, mtime_ns]; empty for a query


def read_lookup_tables(entity: str, source: EntitySource, landing: Path, as_of: date,
                       database: DatabaseSpec | None = None) -> list[LookupTable]:
    """Every lookup table of ``entity``, read in full (a line of tonight's file may refer to any earlier header)."""
    from tasks.ingest.sources import read_query

    tables = []
    for lookup in source.lookup:
        table_source = lookup.as_source()
        if lookup.query is not None:
            text = read_query(f"{entity} lookup {lookup.what}", table_source, database or DatabaseSpec(), as_of)
            tables.append(LookupTable(lookup, _table_columns(text, lookup, f"{entity}: the {lookup.what} query"), {}))
            continue
        paths = select_files(landing, table_source, as_of, f"{entity} lookup {lookup.what!r}")
        parts = []
        for path in paths:
            text = read_source_text(path, table_source)
            text[SOURCE_FILE] = str(path.relative_to(landing)) if path.is_relative_to(landing) else str(path)
            parts.append(_table_columns(text, lookup, f"{entity}: lookup {lookup.what!r}: {path}"))
        tables.append(LookupTable(lookup, pd.concat(parts, ignore_index=True), file_states(paths)))
    return tables


def _table_columns(text: pd.DataFrame, lookup: Lookup, where: str) -> pd.DataFrame:
    """The key and value columns a lookup uses (under the names the mapping gives them) and the lineage."""
    wanted = list(dict.fromkeys([*lookup.key.values(), *lookup.columns.values()]))
    found = {name: find_column(list(text.columns), name, where) for name in wanted}
    if missing := [name for name, column in found.items() if column is None]:
        raise SourceSchemaError(f"{where} lacks column(s) {missing} the lookup names; it has "
                                f"{shown_columns(list(text.columns))}")
    kept = {name: text[column] for name, column in found.items()}
    return pd.DataFrame({**kept, SOURCE_FILE: text[SOURCE_FILE], SOURCE_LINE: text[SOURCE_LINE],
                         PARSE_ERRORS: text[PARSE_ERRORS]})


def _keys(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The (compound) key of each row as one text: parts stripped, joined by ``KEY_SEPARATOR``; missing if a
    part is empty."""
    parts = [normalised_text(frame[c]) for c in columns]
    key = parts[0]
    for part in parts[1:]:
        key = key + KEY_SEPARATOR + part
    return key


def _shown_keys(keys: pd.Series, personal: bool) -> pd.Series:
    if personal:
        return pd.Series("<redacted>", index=keys.index, dtype=object)
    shortened = keys.str.slice(0, SHOWN_KEY).str.replace(KEY_SEPARATOR, "|", regex=False)
    return shortened.map(repr).astype(object)


def look_up(main: pd.DataFrame, main_key_columns: list[str], table: LookupTable,
            personal_key: bool = False) -> tuple[dict[str, pd.Series], np.ndarray, dict[str, int]]:
    """The lookup's columns for each row of ``main`` (text, aligned with it), each row's problem (None where it
    found exactly one row), and counts: rows without a match, rows whose key the table lists twice or more.

    ``main_key_columns``: ``main``'s columns holding the key, in the order of ``lookup.key``. A table row with a
    reader's problem (its fields or lines) is never matched. ``personal_key``: the key is personal data and
    messages say <redacted> instead of it.
    """
    lookup, text = table.lookup, table.text
    where = lookup.shown()
    table_key = _keys(text, list(lookup.key.values()))
    repeated = table_key.duplicated(keep=False).to_numpy() & table_key.notna().to_numpy()
    damaged = text[PARSE_ERRORS].notna().to_numpy()
    usable = ~repeated & ~damaged & table_key.notna().to_numpy()
    keys = _keys(main, main_key_columns)
    usable_keys = table_key[usable]
    position = pc.index_in(pa.array(keys.astype("string[pyarrow]").array),
                           value_set=pa.array(usable_keys.astype("string[pyarrow]").array))
    position = position.to_numpy(zero_copy_only=False)
    matched = ~pd.isna(position)
    rows = np.flatnonzero(usable)[np.where(matched, position, 0).astype(np.int64)]
    take = np.where(matched, rows, -1)
    columns = {target: pd.Series(text[name].array.take(take, allow_fill=True), index=main.index, dtype="string")
               for target, name in lookup.columns.items()}

    problems = np.full(len(main), None, dtype=object)
    missed = np.flatnonzero(~matched)
    counts = {"rows_without_match": 0, "rows_with_repeated_key": 0, "rows_with_damaged_match": 0}
    if len(missed):
        missed_keys = keys.iloc[missed]
        shown = _shown_keys(missed_keys.fillna(""), personal_key).to_numpy()
        empty = missed_keys.isna().to_numpy()
        twice = missed_keys.isin(table_key[repeated]).to_numpy() & ~empty
        broken = missed_keys.isin(table_key[damaged & ~repeated]).to_numpy() & ~empty & ~twice
        absent = ~empty & ~twice & ~broken
        on = "|".join(lookup.key)
        problems[missed[empty]] = f"no {lookup.what}: {on} is empty"
        problems[missed[absent]] = "no " + lookup.what + " " + shown[absent] + " in " + where
        if twice.any():
            problems[missed[twice]] = _repeated_messages(missed_keys[twice], shown[twice], table_key, text, lookup)
        if broken.any():
            problems[missed[broken]] = (lookup.what + " " + shown[broken] + " in " + where
                                        + " is on a damaged line")
        counts = {"rows_without_match": int((absent | empty).sum()), "rows_with_repeated_key": int(twice.sum()),
                  "rows_with_damaged_match": int(broken.sum())}
    return columns, problems, counts


def _repeated_messages(keys: pd.Series, shown: np.ndarray, table_key: pd.Series, text: pd.DataFrame,
                       lookup: Lookup) -> np.ndarray:
    """"order header '10250' is not unique in orders.csv (2 rows: lines 3, 4)": the lines listing the key (the
    first few, with their file when the table has several), worked out once per distinct key."""
    wanted = table_key.isin(keys.unique()).to_numpy()
    listed = {}
    several_files = text[SOURCE_FILE].nunique() > 1
    for key, rows in text[wanted].groupby(table_key[wanted], sort=False):
        places = [f"{file} line {line}" if several_files else f"line {line}"
                  for file, line in zip(rows[SOURCE_FILE].iloc[:SHOWN_LINES], rows[SOURCE_LINE].iloc[:SHOWN_LINES],
                                        strict=True)]
        more = f" and {len(rows) - SHOWN_LINES} more" if len(rows) > SHOWN_LINES else ""
        listed[key] = f"{len(rows)} rows: {', '.join(places)}{more}"
    return np.array([f"{lookup.what} {s} is not unique in {lookup.shown()} ({listed[k]})"
                     for k, s in zip(keys, shown, strict=True)], dtype=object)


def attach_lookups(text: pd.DataFrame, source: EntitySource, tables: list[LookupTable], where: str,
                   personal: set[str] | frozenset[str] = frozenset()) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """The entity's source text with each lookup's columns added under their canonical names, and each row's
    lookup problems appended to ``_parse_errors``; the rows, their order and lineage are unchanged.

    ``personal``: the entity's personal canonical columns; a key held in one is never quoted in a message.
    Returns the text and, per lookup (by ``what``), the counts of :func:`look_up`.
    """
    if not tables:
        return text, {}
    text = text.copy(deep=False)
    mapped_from = {column: canonical for canonical, column in source.columns.items()}
    errors = (text[PARSE_ERRORS] if PARSE_ERRORS in text.columns
              else pd.Series(pd.NA, index=text.index, dtype="string")).astype("string")
    counts = {}
    for table in tables:
        key_columns = []
        for name in table.lookup.key:
            column = find_column(list(text.columns), name, where)
            if column is None:
                raise SourceSchemaError(f"{where} lacks column {name!r}, the key of lookup {table.lookup.what!r}; "
                                        f"it has {shown_columns(list(text.columns))}")
            key_columns.append(column)
        personal_key = any(mapped_from.get(c, c) in personal for c in key_columns)
        columns, problems, counts[table.lookup.what] = look_up(text, key_columns, table, personal_key)
        for target, values in columns.items():
            text[target] = values
        hit = np.flatnonzero(problems != None)  # noqa: E711 - element-wise on an object array
        if len(hit):  # only the few rows with a problem are touched: a clean export costs nothing here
            before = errors.iloc[hit]
            errors.iloc[hit] = np.where(before.isna().to_numpy(), problems[hit],
                                        before.fillna("").to_numpy(dtype=object) + "; " + problems[hit])
    text[PARSE_ERRORS] = errors
    return text, counts


def repeated_keys(table: LookupTable) -> int:
    """Distinct keys the table lists more than once."""
    keys = _keys(table.text, list(table.lookup.key.values())).dropna()
    return int(keys[keys.duplicated()].nunique())


def lookup_problem_rows(frame: pd.DataFrame, source: EntitySource) -> int:
    """Parsed rows whose lookups failed (their ``_parse_errors`` name a lookup's table)."""
    if not source.lookup or PARSE_ERRORS not in frame.columns:
        return 0
    errors = frame[PARSE_ERRORS].astype("string")
    failed = pd.Series(False, index=frame.index)
    for lookup in source.lookup:
        failed |= (errors.str.contains(f"no {lookup.what}", regex=False)
                   | errors.str.contains(f" in {lookup.shown()}", regex=False)).fillna(False)
    return int(failed.sum())


def lookups_reusable(recorded: dict[str, object] | None, tables: list[LookupTable]) -> bool:
    """An earlier run's rows stand in for their files only if every lookup found its match then and would find
    the same one tonight: no row waited for a missing header (it may have arrived), the tables' earlier files
    are unchanged and new ones sort after them, and no key is repeated (a new file could repeat an old key)."""
    if not tables:
        return True
    if not recorded or recorded.get("problem_rows", 1) or any(t.lookup.query is not None for t in tables):
        return False
    files = recorded.get("files") or {}
    current = [Path(p) for t in tables for p in t.files]
    if not only_appended(files, current):
        return False
    return not any(repeated_keys(t) for t in tables)
