"""Source mappings: a YAML file that tells the ingest stage where each entity lives and how to read it.

A user connects their own export by writing a mapping, not Python. See README, "Source mappings".
Each entity comes from exactly one of: files (CSV/Parquet; one file, a glob, or one file per day), a SQL query
(through SQLAlchemy), or a derivation from another entity (e.g. customers from invoice lines).
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crm_analytics.schema import CANONICAL_COLUMNS, OPTIONAL_ENTITIES, UNCATEGORISED, ColumnType

PACKAGED_MAPPINGS = Path(__file__).resolve().parent / "mappings"
_ENV_PATTERN = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
AGGREGATIONS = ("first", "last", "mode", "const")


class MappingError(ValueError):
    """The mapping itself is wrong (a permanent error: retrying cannot help)."""


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without a default is an error."""

    def replace(match: re.Match) -> str:
        value = os.environ.get(match["name"])
        if value is None:
            if match["default"] is None:
                raise MappingError(f"environment variable {match['name']} is not set (used in the mapping)")
            return match["default"]
        return value

    return _ENV_PATTERN.sub(replace, text)


WHITESPACE = "whitespace"


class CsvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delimiter: str = Field(",", description=f"one character, or {WHITESPACE!r}: runs of blanks and tabs separate "
                           "fields (column-aligned text exports such as CDNOW's).")
    quote_char: str = '"'
    encoding: str = Field("utf-8", description="utf-8 (a BOM is ignored), latin-1, cp1252, ...")
    header: bool = Field(True, description="the first line names the columns; false: name them in column_names.")
    column_names: list[str] | None = Field(None, description="the columns of a file without a header line.")

    @model_validator(mode="after")
    def _names_without_header(self) -> CsvOptions:
        if self.header == (self.column_names is not None):
            raise ValueError("csv: give column_names exactly when header is false")
        if self.delimiter != WHITESPACE and len(self.delimiter) != 1:
            raise ValueError(f"csv delimiter {self.delimiter!r}: one character or {WHITESPACE!r}")
        return self


class RegexReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    repl: str = ""


class DeriveSpec(BaseModel):
    """Build an entity the export lacks from another one, one row per key.

    ``columns`` maps a canonical column to ``first:<col>``, ``last:<col>`` (by the source's timestamp),
    ``mode:<col>`` (most frequent value) or ``const:<value>``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_entity: str = Field(alias="from")
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _known_aggregations(cls, columns: dict[str, str]) -> dict[str, str]:
        for target, spec in columns.items():
            how = spec.split(":", 1)[0]
            if how not in AGGREGATIONS or ":" not in spec:
                raise ValueError(f"derive column {target!r}: {spec!r} is not one of {AGGREGATIONS} as 'how:column'")
        return columns


class EntitySource(BaseModel):
    """Where one entity comes from and how its columns map onto the canonical contract."""

    model_config = ConfigDict(extra="forbid")

    files: str | None = Field(None, description="File or glob, relative to the landing folder (or absolute).")
    query: str | None = Field(None, description="SQL query; may use :as_of_end (first instant after the as-of date).")
    derive: DeriveSpec | None = None
    format: Literal["csv", "parquet", "baskets"] = Field(
        "csv", description="csv | parquet | baskets: one basket per line, its items separated by csv.delimiter and "
        "no header; read as the columns `basket` (its line number) and `item`.",
    )
    daily: bool = Field(
        default=False,
        description="File names start with their date (YYYY-MM-DD); only files dated on or before the as-of date "
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
    keep: list[str] = Field(default_factory=list, description="extra columns to keep (their canonical names).")
    defaults: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="canonical column -> constant, for a column the export lacks (e.g. "
        "quantity: 1 for a log without quantities); typed like the column.",
    )
    compose: dict[str, list[str]] = Field(
        default_factory=dict, description="canonical column -> the columns whose text joined by '|' makes it, e.g. "
        "order_id: [customer_id, order_ts] for a log with one basket per customer and day, or [_source_file, "
        "_source_line] for one order per row. Parts are canonical (mapped or defaulted) or lineage columns.",
    )
    unit_price_is_line_total: bool = Field(
        False, description="order_lines: the column mapped to unit_price holds the line's total amount; the unit "
        "price is that amount divided by the quantity.",
    )
    regex_replace: dict[str, RegexReplace] = Field(
        default_factory=dict, description="canonical column -> regex fix applied to the text before typing."
    )
    pii: list[str] = Field(
        default_factory=list,
        description="personal columns (email, name, phone): kept in raw/ only; later layers get a keyed pseudonym.",
    )
    cancellation_prefix: str | None = Field(
        None, description="order_id prefix that marks cancellation invoices (counted in the manifest)."
    )

    @model_validator(mode="after")
    def _one_origin(self) -> EntitySource:
        origins = [name for name in ("files", "query", "derive") if getattr(self, name) is not None]
        if len(origins) != 1:
            raise ValueError(f"an entity needs exactly one of files, query or derive; got {origins or 'none'}")
        for target, parts in self.compose.items():
            if not parts or target in parts:
                raise ValueError(f"compose {target!r}: needs one or more other columns, got {parts}")
        if self.format == "baskets" and self.files is None:
            raise ValueError("format baskets is for files")
        return self

    def provided(self) -> set[str]:
        """Canonical columns the mapping itself fills in (constants and compositions), not the source."""
        return set(self.defaults) | set(self.compose)


class DatabaseSpec(BaseModel):
    """Where the SQL entities' database is. The URL (with its credentials) never lives in the mapping."""

    model_config = ConfigDict(extra="forbid")

    url_env: str = Field("CRM_DATABASE_URL", description="Environment variable holding the SQLAlchemy URL.")
    secret_block: str | None = Field(None, description="Prefect Secret block holding the URL (used if set).")


class QualityOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_quarantine_rate: dict[str, float] = Field(
        default_factory=dict, description="entity -> allowed quarantined fraction, overriding the run's default."
    )


class SourceMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "unnamed"
    landing_dir: str = "landing"
    timezone: str = "UTC"
    database: DatabaseSpec | None = None
    quality: QualityOverrides = QualityOverrides()
    entities: dict[str, EntitySource]

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, entities: dict[str, EntitySource]) -> dict[str, EntitySource]:
        unknown = set(entities) - set(CANONICAL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown entities {sorted(unknown)}; known: {sorted(CANONICAL_COLUMNS)}")
        if "customers" not in entities and "order_lines" in entities:  # a purchase log names its customers
            entities = {**entities, "customers": EntitySource(derive=DeriveSpec.model_validate(
                {"from": "order_lines", "columns": {"signup_date": "first:order_ts"}}))}
        missing = set(CANONICAL_COLUMNS) - set(OPTIONAL_ENTITIES) - set(entities)
        if missing:
            raise ValueError(f"mapping lacks entities {sorted(missing)}")
        if "order_lines" not in entities and "churn_labels" not in entities:
            raise ValueError("mapping needs order_lines (transactions) or churn_labels (explicit labels), or both")
        if "products" in entities and "order_lines" not in entities:
            raise ValueError("products without order_lines: nothing would use them")
        if "order_lines" in entities and "products" not in entities:
            entities = {**entities, "products": EntitySource(derive=DeriveSpec.model_validate(
                {"from": "order_lines", "columns": {"category": f"const:{UNCATEGORISED}"}}))}
        for name, source in entities.items():
            if source.derive is not None:
                origin = entities.get(source.derive.from_entity)
                if origin is None or origin.derive is not None:
                    raise ValueError(f"{name} derives from {source.derive.from_entity!r}, which is not a read entity")
        return entities

    @model_validator(mode="after")
    def _database_for_queries(self) -> SourceMapping:
        if any(s.query for s in self.entities.values()) and self.database is None:
            self.database = DatabaseSpec()
        return self

    def landing_path(self, data_root: Path, override: str | None = None) -> Path:
        path = Path(expand_env(override or self.landing_dir)).expanduser()
        return path if path.is_absolute() else data_root / path

    def source(self, entity: str) -> EntitySource:
        """The entity's source, or for an optional entity the export lacks, one with no extra columns."""
        return self.entities.get(entity) or EntitySource(files="absent")

    def column_types(self, entity: str) -> dict[str, ColumnType]:
        source = self.source(entity)
        types = dict(CANONICAL_COLUMNS[entity])
        types.update({column: source.types.get(column, "string") for column in source.keep})
        return types

    def read_order(self) -> list[str]:
        """Entities read from a source first, then those derived from them."""
        return sorted(self.entities, key=lambda name: (self.entities[name].derive is not None, name))


def resolve_mapping_path(mapping: str | Path) -> Path:
    """A mapping is a path, or the name of one shipped with the package (e.g. ``sample``)."""
    path = Path(mapping).expanduser()
    if path.suffix in {".yaml", ".yml"}:
        if path.exists():
            return path
        raise MappingError(f"mapping file {path} does not exist")
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


def mapping_fingerprint(mapping: str | Path) -> str:
    """A hash of the mapping file's text: part of the cache key of every stage the mapping shapes."""
    import hashlib

    return hashlib.sha256(resolve_mapping_path(mapping).read_bytes()).hexdigest()[:16]


def select_files(landing: Path, source: EntitySource, as_of: date) -> list[Path]:
    """The files of one entity, sorted; for daily files only those dated on or before ``as_of``."""
    pattern = expand_env(source.files or "")
    base = Path("/") if Path(pattern).is_absolute() else landing
    candidates = sorted(p for p in base.glob(pattern.lstrip("/") if base == Path("/") else pattern) if p.is_file())
    if not source.daily:
        return candidates
    selected = []
    for path in candidates:
        try:
            file_date = date.fromisoformat(path.name[:10])
        except ValueError as exc:
            raise MappingError(f"daily file {path} does not start with a YYYY-MM-DD date") from exc
        if file_date <= as_of:
            selected.append(path)
    return selected
