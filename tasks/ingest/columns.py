"""Source column names: matching a mapped name to a file's header (exactly, or ignoring case and blanks), the
checks on a header, and naming columns in messages without quoting values that a data row put in a header."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from crm_analytics.mapping import SourceMapping
from crm_analytics.schema import PARSE_ERRORS, REQUIRED_COLUMNS, SOURCE_FILE, SOURCE_LINE, SOURCE_LINES
from tasks.common import SourceSchemaError

LINEAGE = (SOURCE_FILE, SOURCE_LINE, SOURCE_LINES, PARSE_ERRORS)


def _loose(name: str) -> str:
    """A column name as matched when an exact match fails: without surrounding blanks, case folded."""
    return name.strip().casefold()


VALUE_LIKE = re.compile(r"[\d\s.,:;/+()'#-]+|.*@.*|.{65,}")  # numbers, dates, phones, e-mails, long text


def shown_columns(columns: list[str]) -> str:
    """Column names for a message. A header line that is really the first row of data (a file without a header)
    would put values in every message naming columns: names that look like values are shown as <value?>."""
    names = [c for c in columns if c not in LINEAGE]
    shown = ["<value?>" if VALUE_LIKE.fullmatch(c) else c for c in names]
    hint = (" (the first line looks like data: for a file without a header set csv.header: false and "
            "csv.column_names)") if "<value?>" in shown else ""
    return f"{shown}{hint}"


def find_column(columns: list[str], name: str, where: str) -> str | None:
    """The source column ``name`` names: itself, or else the one column equal to it when case and surrounding
    blanks are ignored (an export's header changed ``country`` to ``Country``); two such columns are an error."""
    if name in columns:
        return name
    candidates = [c for c in columns if c not in LINEAGE and _loose(c) == _loose(name)]
    if len(candidates) > 1:
        raise SourceSchemaError(f"{where}: no column {name!r}, and {shown_columns(candidates)} all match it when "
                                "case and blanks "
                                "are ignored; map one of them in columns:")
    return candidates[0] if candidates else None


def check_header(path: Path, names: list[str]) -> list[str]:
    """A file's column names, checked: an empty name becomes ``unnamed_<position>`` (it can then be mapped, or
    is listed as unused); a name given twice, or holding a NUL byte, is an error naming the names (column
    names are not personal data; values are never shown)."""
    names = [name if name.strip() else f"unnamed_{position}" for position, name in enumerate(names, start=1)]
    if any("\x00" in name for name in names):
        raise SourceSchemaError(f"{path}: the header line has NUL bytes (a binary file, or UTF-16 text?)")
    seen: dict[str, list[int]] = {}
    for position, name in enumerate(names, start=1):
        seen.setdefault(name, []).append(position)
    if twice := {name: positions for name, positions in seen.items() if len(positions) > 1}:
        listed = "; ".join(f"{'<value?>' if VALUE_LIKE.fullmatch(name) else repr(name)} (columns "
                           f"{', '.join(map(str, p))})" for name, p in twice.items())
        raise SourceSchemaError(f"{path}: the header has duplicate column names: {listed}; rename them")
    return names


class ColumnUse(NamedTuple):
    """How a source's columns serve an entity: the source column of each canonical one that is present, the
    mapped names found only by ignoring case and blanks, the columns nothing uses, and absent optional ones."""

    renames: dict[str, str]
    renamed: dict[str, str]
    unused: list[str]
    absent: list[str]


def column_use(columns: list[str], entity: str, mapping: SourceMapping, where: str) -> ColumnUse:
    """Match ``columns`` (a file's header, or a query's columns) to the entity's canonical columns."""
    source = mapping.source(entity)
    wanted = {canonical: source.columns.get(canonical, canonical) for canonical in mapping.column_types(entity)}
    wanted |= {part: source.columns.get(part, part) for parts in source.compose.values() for part in parts
               if part not in wanted and part not in LINEAGE}
    renames, renamed, absent = {}, {}, []
    for canonical, name in wanted.items():
        found = find_column(columns, name, f"{where} (columns.{canonical})")
        if found is None:
            renames[canonical] = name
            if canonical not in REQUIRED_COLUMNS.get(entity, ()) and canonical not in source.provided():
                absent.append(canonical)
            continue
        renames[canonical] = found
        if found != name:
            renamed[name] = found
    used = set(renames.values())
    unused = [c for c in columns if c not in used and c not in LINEAGE]
    return ColumnUse(renames, renamed, unused, absent)
