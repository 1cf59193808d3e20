"""Source mappings: a YAML file that tells the ingest stage where each entity lives and how to read it.

A user connects their own export by writing a mapping, not Python. See README, "Source mappings".
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from crm_analytics.schema import CANONICAL_COLUMNS, ColumnType

PACKAGED_MAPPINGS = Path(__file__).resolve().parent / "mappings"


class MappingError(ValueError):
    """The mapping itself is wrong (a permanent error: retrying cannot help)."""


class CsvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delimiter: str = ","
    quote_char: str = '"'
    encoding: str = "utf-8"


class EntitySource(BaseModel):
    """Where one entity comes from and how its columns map onto the canonical contract."""

    model_config = ConfigDict(extra="forbid")

    files: str = Field(description="File or glob, relative to the landing folder (or absolute).")
    format: Literal["csv", "parquet"] = "csv"
    daily: bool = Field(
        default=False,
        description="File names carry their date (YYYY-MM-DD); only files dated on or before the as-of date "
        "are read, so a late file is picked up by a rerun.",
    )
    csv: CsvOptions = CsvOptions()
    columns: dict[str, str] = Field(
        default_factory=dict, description="canonical column -> source column; unmapped ones keep their name."
    )
    formats: dict[str, str] = Field(
        default_factory=dict, description="canonical timestamp column -> strptime format (default: ISO 8601)."
    )
    types: dict[str, ColumnType] = Field(default_factory=dict, description="types of extra kept columns.")
    keep: list[str] = Field(default_factory=list, description="extra source columns to keep (canonical names).")


class SourceMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "unnamed"
    landing_dir: str = "landing"
    timezone: str = "UTC"
    entities: dict[str, EntitySource]

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, entities: dict[str, EntitySource]) -> dict[str, EntitySource]:
        unknown = set(entities) - set(CANONICAL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown entities {sorted(unknown)}; known: {sorted(CANONICAL_COLUMNS)}")
        missing = set(CANONICAL_COLUMNS) - set(entities)
        if missing:
            raise ValueError(f"mapping lacks entities {sorted(missing)}")
        return entities

    def landing_path(self, data_root: Path) -> Path:
        path = Path(self.landing_dir)
        return path if path.is_absolute() else data_root / path

    def column_types(self, entity: str) -> dict[str, ColumnType]:
        source = self.entities[entity]
        types = dict(CANONICAL_COLUMNS[entity])
        types.update({column: source.types.get(column, "string") for column in source.keep})
        return types


def resolve_mapping_path(mapping: str | Path) -> Path:
    """A mapping is a path, or the name of one shipped with the package (e.g. ``sample``)."""
    path = Path(mapping)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    packaged = PACKAGED_MAPPINGS / f"{mapping}.yaml"
    if packaged.exists():
        return packaged
    shipped = sorted(p.stem for p in PACKAGED_MAPPINGS.glob("*.yaml"))
    raise MappingError(f"mapping {str(mapping)!r} is neither a YAML file nor a shipped mapping {shipped}")


def load_mapping(mapping: str | Path) -> SourceMapping:
    path = resolve_mapping_path(mapping)
    try:
        payload = yaml.safe_load(path.read_text())
        return SourceMapping.model_validate(payload)
    except (yaml.YAMLError, ValueError) as exc:
        raise MappingError(f"invalid mapping {path}: {exc}") from exc


def select_files(landing: Path, source: EntitySource, as_of: date) -> list[Path]:
    """The files of one entity, sorted; for daily files only those dated on or before ``as_of``."""
    pattern = source.files
    candidates = sorted(Path(p) for p in (landing.glob(pattern) if not Path(pattern).is_absolute()
                                          else Path("/").glob(pattern.lstrip("/"))))
    if not source.daily:
        return candidates
    selected = []
    for path in candidates:
        try:
            file_date = date.fromisoformat(path.stem[:10])
        except ValueError as exc:
            raise MappingError(f"daily file {path} does not start with a YYYY-MM-DD date") from exc
        if file_date <= as_of:
            selected.append(path)
    return selected
