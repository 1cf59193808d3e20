"""Source mappings: a YAML file that tells the ingest stage where each entity lives and how to read it.

A user connects their own export by writing a mapping, not Python. See README, "Source mappings".
Each entity comes from exactly one of: files (CSV/Parquet; one file, a glob, or one file per day), a SQL query
(through SQLAlchemy), or a derivation from another entity (e.g. customers from invoice lines).

``load_mapping`` checks everything a mapping names (columns, regexes, time zone, timestamp formats, paths) before
any file is read and reports each error as one line naming the mapping file and the key path. ``select_files``
reads only inside the landing folder (links out of it are refused) and fails with one line when nothing matches.

Over 500 lines on purpose: the mapping's schema and every load-time check of it are one contract a user reads
(each option sits beside the check that reports its misuse).
"""

from __future__ import annotations

import os
import re
import zoneinfo
from datetime import date
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crm_analytics.errors import InputError, MappingError, MissingInputError
from crm_analytics.privacy import ALWAYS_PERSONAL, KEY_COLUMNS
from crm_analytics.schema import (
    CANONICAL_COLUMNS,
    LINEAGE_COLUMNS,
    OPTIONAL_ENTITIES,
    UNCATEGORISED,
    ColumnType,
)

PACKAGED_MAPPINGS = Path(__file__).resolve().parent / "mappings"
_ENV_PATTERN = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
AGGREGATIONS = ("first", "last", "mode", "const")
DERIVED_KEYS = {"customers": "customer_id", "products": "product_id"}  # one derived row per key
PANDAS_FORMATS = ("ISO8601", "mixed")  # pandas' named timestamp formats, accepted besides strptime formats


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
SOURCE_NAME = "source"  # the column naming the source of each row of an entity with several sources


class CsvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delimiter: str = Field(",", description=f"one character, or {WHITESPACE!r}: runs of blanks and tabs separate "
                           "fields (column-aligned text exports such as CDNOW's).")
    quote_char: str = '"'
    encoding: str = Field("utf-8", description="utf-8 (a BOM is ignored), latin-1, cp1252, ...")
    header: bool = Field(True, description="the first line names the columns; false: name them in column_names.")
    column_names: list[str] | None = Field(None, description="the columns of a file without a header line.")
    decimal: Literal[".", ","] = Field(".", description="decimal mark of int and float columns: '.' or ','.")
    thousands: Literal[",", ".", " ", "'"] | None = Field(
        None, description="thousands separator of int and float columns (groups of three digits; ' ' also takes "
        "non-breaking spaces); none by default, so '1,234' is a parse error rather than a guess.")
    multiline_values: bool = Field(
        False, description="quoted values may hold line breaks (exports with multi-line text fields); by default a "
        "row spanning several lines is quarantined, as a stray quote merges lines that way.")
    require_final_newline: bool = Field(
        True, description="the last line must end with a line break; if not, its row is quarantined (the file may "
        "be cut off, e.g. a price 12.99 cut to 12.). false: accept files written without one.")

    @model_validator(mode="after")
    def _names_without_header(self) -> CsvOptions:
        if self.header == (self.column_names is not None):
            raise ValueError("csv: give column_names exactly when header is false")
        if self.delimiter != WHITESPACE and len(self.delimiter) != 1:
            raise ValueError(f"csv delimiter {self.delimiter!r}: one character or {WHITESPACE!r}")
        return self

    @model_validator(mode="after")
    def _numbers_and_encoding(self) -> CsvOptions:
        names = self.column_names or []
        if twice := sorted({n for n in names if names.count(n) > 1 or not n.strip()}):
            raise ValueError(f"csv column_names: {twice} given twice or blank")
        if self.thousands == self.decimal:
            raise ValueError(f"csv thousands {self.thousands!r} is also the decimal mark")
        try:
            ascii_compatible = bytes(range(128)).decode(self.encoding) == bytes(range(128)).decode("ascii")
        except LookupError:
            raise ValueError(f"csv encoding {self.encoding!r}: unknown encoding") from None
        except UnicodeDecodeError:
            ascii_compatible = False
        if not ascii_compatible:  # lines are counted and headers read byte-wise: a line break must be the byte \n
            raise ValueError(f"csv encoding {self.encoding!r}: only encodings that keep ASCII as is (utf-8, latin-1, "
                             "cp1252, ...) are read; save the file as UTF-8")
        return self


class RegexReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    repl: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return pattern

    @field_validator("repl")
    @classmethod
    def _valid_replacement(cls, repl: str, info: ValidationInfo) -> str:
        if "pattern" not in info.data:  # the pattern itself is wrong; that error is reported
            return repl
        try:  # substituting into "" still compiles the template: unknown groups and bad escapes show here
            re.compile(info.data["pattern"]).sub(repl, "")
        except (re.error, IndexError) as exc:
            raise ValueError(f"invalid replacement {repl!r}: {exc}") from None
        return repl


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


def _inside_landing(files: str | None) -> str | None:
    if files is not None and (problem := files_problem(files)):
        raise ValueError(problem)
    return files


LandingFiles = Annotated[str | None, AfterValidator(_inside_landing)]  # a files pattern that stays inside landing_dir


class Lookup(BaseModel):
    """Columns an entity takes from another table by key, many rows to one: an order line's customer and date from
    its order header, a product's category name from the category table.

    A lookup never multiplies a row: each row finds at most one row of the table. A row whose key the table
    lacks, or lists more than once, is kept with its lookup columns empty and the reason in ``_parse_errors``
    (e.g. "no order header '10248' in orders.csv"), so validation quarantines it with the key named.
    """

    model_config = ConfigDict(extra="forbid")

    what: str = Field(description="what one row of the table is, as messages name it: 'order header', 'category'.")
    files: LandingFiles = Field(None, description="the table's file or glob, relative to landing_dir.")
    query: str | None = Field(None, description="or a SQL query giving the table (may use :as_of_end).")
    format: Literal["csv", "parquet"] = "csv"
    daily: bool = Field(False, description="file names start with their date: only files up to the as-of date.")
    csv: CsvOptions = CsvOptions()
    key: dict[str, str] = Field(description="this entity's source column -> the table's column holding the same "
                                "key; several pairs make a compound key. Blanks around keys are ignored.")
    columns: dict[str, str] = Field(description="canonical (or kept) column of the entity -> the table's column.")

    @model_validator(mode="after")
    def _complete(self) -> Lookup:
        if (self.files is None) == (self.query is None):
            raise ValueError(f"lookup {self.what!r}: needs exactly one of files or query")
        if not self.key or not self.columns:
            raise ValueError(f"lookup {self.what!r}: needs the key and the columns it brings")
        if self.daily and self.files is None:
            raise ValueError(f"lookup {self.what!r}: only files can be daily")
        return self

    def as_source(self) -> EntitySource:
        """The table as a source to read (its files or query, format and CSV options)."""
        return EntitySource(files=self.files, query=self.query, format=self.format, daily=self.daily, csv=self.csv)

    def shown(self) -> str:
        """Where the table is, as messages name it: its files pattern, or "its query"."""
        return self.files if self.files is not None else f"the {self.what} query"


class Discount(BaseModel):
    """Turns an order line's unit price into the price paid: the discount is part of the price, not lost."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(description="the line's source column holding the discount (empty means none).")
    kind: Literal["fraction", "percent", "unit_amount", "line_amount"] = Field(
        "fraction", description="fraction: 0.15 is 15 % off (Northwind's Discount); percent: 15 is 15 % off; "
        "unit_amount: off each unit; line_amount: off the line's total (divided over its quantity).")



class IdentitySpec(BaseModel):
    """How records of several sources (or several records of one) are resolved to one person: deterministic
    keys, strongest first, compared on keyed pseudonyms of their normalised values (see ``tasks.identity``)."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, Literal["id", "email", "phone"]] = Field(
        description="column -> how it is normalised before matching (id: blanks trimmed; email: blanks removed, "
        "lower case; phone: digits with country code), in precedence order: a stronger key keeps apart records "
        "a weaker one would join.")
    precedence: list[str] = Field(default_factory=list, description="source names, the most trusted first: whose "
                                  "attribute wins when sources disagree (default: the order of the sources).")
    phone_country_code: str | None = Field(None, description="digits of the country code of national numbers (a "
                                           "leading 0), e.g. '44': 020 7946 0958 is +44 20 7946 0958.")

    @field_validator("phone_country_code")
    @classmethod
    def _digits(cls, code: str | None) -> str | None:
        if code is not None and not re.fullmatch(r"[1-9]\d{0,2}", code):
            raise ValueError(f"phone_country_code {code!r}: one to three digits without + or 00, e.g. '44'")
        return code


class EntitySource(BaseModel):
    """Where one entity comes from and how its columns map onto the canonical contract."""

    model_config = ConfigDict(extra="forbid")

    files: LandingFiles = Field(None, description="File or glob, relative to the landing folder (no absolute path, "
                              "no '..'): every file read stays inside it; set landing_dir to choose the folder.")
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
        description="personal columns (email, name, phone): kept in raw/ only; later layers get a keyed pseudonym. "
        "A column named email is personal without being listed.",
    )
    not_personal: list[str] = Field(
        default_factory=list,
        description="columns that look like e-mail addresses or phone numbers but are not personal data (e.g. a "
        "shop's own support address): ingest fails on an undeclared column that looks personal unless it is here.",
    )
    cancellation_prefix: str | None = Field(
        None, description="order_id prefix that marks cancellation invoices (counted in the manifest)."
    )
    lookup: list[Lookup] = Field(
        default_factory=list, description="columns taken from other tables by key (order headers, categories); "
        "see Lookup.")
    discount: Discount | None = Field(
        None, description="order_lines: a discount column that makes unit_price the price paid.")
    identity: IdentitySpec | None = Field(
        None, description="customers: resolve one person across sources by declared keys (see IdentitySpec).")
    sources: dict[str, EntitySource] = Field(
        default_factory=dict, description="several sources of this entity by name (e.g. shop and loyalty), each "
        "with its own origin and column mapping, instead of one origin here; their rows are unioned and carry the "
        f"name in the column {SOURCE_NAME!r}.")

    @model_validator(mode="after")
    def _one_origin(self) -> EntitySource:
        origins = [name for name in ("files", "query", "derive") if getattr(self, name) is not None]
        if self.sources:
            if origins:
                raise ValueError(f"an entity with sources takes its rows from them; remove {origins}")
            if inner := [name for name, source in self.sources.items() if source.sources or source.derive]:
                raise ValueError(f"sources {inner}: a source is files or a query (no nested sources, no derive)")
            return self
        if len(origins) != 1:
            raise ValueError(f"an entity needs exactly one of files, query, derive or sources; got "
                             f"{origins or 'none'}")
        for target, parts in self.compose.items():
            if not parts or target in parts:
                raise ValueError(f"compose {target!r}: needs one or more other columns, got {parts}")
        if self.format == "baskets" and self.files is None:
            raise ValueError("format baskets is for files")
        return self

    def provided(self) -> set[str]:
        """Canonical columns the mapping fills in (constants, compositions, lookups), not the source's own."""
        return set(self.defaults) | set(self.compose) | {c for lookup in self.lookup for c in lookup.columns}


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

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}: use an IANA name such as Europe/Berlin or UTC") from None
        return timezone

    @model_validator(mode="after")
    def _database_for_queries(self) -> SourceMapping:
        every = [s for source in self.entities.values() for s in (source, *source.sources.values())]
        queries = [s.query for s in every] + [lookup.query for s in every for lookup in s.lookup]
        if any(queries) and self.database is None:
            self.database = DatabaseSpec()
        return self

    @model_validator(mode="after")
    def _columns_exist(self) -> SourceMapping:
        """Every column a key names exists in its entity, so a typo fails here, not silently at ingest."""
        problems = [problem for name, source in self.entities.items()
                    for problem in entity_problems(name, source, self.entities)]
        for name, source in self.entities.items():  # each source of an entity with several, under its own path
            for label, sub in source.sources.items():
                problems += [p.replace(f"entities.{name}.", f"entities.{name}.sources.{label}.", 1)
                             for p in entity_problems(name, sub, self.entities)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _always_personal(self) -> SourceMapping:
        """A column named ``email`` is personal even if ``pii`` forgets it (``not_personal`` opts out): a
        forgotten declaration must not put plain e-mail addresses into validated/ and clean/."""
        for name, source in self.entities.items():
            source = source.model_copy(update={"sources": {n: _with_always_personal(name, s)
                                                           for n, s in source.sources.items()}})
            source = union_of_sources(_with_always_personal(name, source))
            if source.identity is not None and not source.identity.precedence:
                source = source.model_copy(update={"identity": source.identity.model_copy(
                    update={"precedence": list(source.sources)})})
            self.entities = {**self.entities, name: source}
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


def _with_always_personal(entity: str, source: EntitySource) -> EntitySource:
    columns = set(CANONICAL_COLUMNS[entity]) | set(source.keep)
    declared = {*source.pii, *source.not_personal}
    added = [c for c in ALWAYS_PERSONAL if c in columns and c not in declared]
    return source.model_copy(update={"pii": [*source.pii, *added]}) if added else source


def union_of_sources(source: EntitySource) -> EntitySource:
    """An entity with several sources, described as the rows it unions: every source keeps every source's kept
    columns (typed alike) and the name column, and the entity's personal columns are any source's."""
    if not source.sources:
        return source
    subs = source.sources.values()
    keep = list(dict.fromkeys([c for s in subs for c in s.keep if c != SOURCE_NAME] + [SOURCE_NAME]))
    types = {column: kind for s in subs for column, kind in s.types.items()}
    pii = list(dict.fromkeys(c for s in subs for c in s.pii))
    not_personal = list(dict.fromkeys(c for s in subs for c in s.not_personal if c not in pii))
    each = {name: s.model_copy(update={"keep": [c for c in keep if c != SOURCE_NAME], "types": types, "pii": pii,
                                       "not_personal": not_personal}) for name, s in source.sources.items()}
    return source.model_copy(update={"keep": keep, "types": types, "pii": pii, "not_personal": not_personal,
                                     "sources": each})


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
    """Read and check a mapping; every error in it is found here, before any file is read, as one line
    ``mapping <file>: <key path>: <what is wrong>`` (several errors joined by "; ")."""
    path = resolve_mapping_path(mapping)
    try:
        payload = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise MappingError(f"mapping {path}: {yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"mapping {path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(payload, dict):
        raise MappingError(f"mapping {path}: expected keys such as name, landing_dir and entities, got "
                           f"{'an empty file' if payload is None else type(payload).__name__}")
    try:
        return SourceMapping.model_validate(payload)
    except ValidationError as exc:
        raise MappingError(f"mapping {path}: {validation_problems(exc)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as "line L, column C: what" (PyYAML's own text spans several lines and quotes the file)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return one_line(f"{where}invalid YAML: {problem}" + (f" ({context})" if context else ""))


def validation_problems(exc: ValidationError) -> str:
    """Pydantic's errors as "key.path: what", joined by "; " on one line (no input values are quoted)."""
    parts: dict[str, list[str]] = {}
    unions: dict[str, list[str]] = {}  # a value that fits no member of a union: one entry, not one per member
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [str(part) for part in error["loc"]]
        if loc and loc[-1] in _UNION_MEMBERS:
            unions.setdefault(".".join(loc[:-1]), []).append(_UNION_MEMBERS[loc[-1]])
            parts.setdefault(".".join(loc[:-1]), [])
        else:
            parts.setdefault(".".join(loc), []).append(error["msg"].removeprefix("Value error, "))
    for path, members in unions.items():
        parts[path].append("expected " + (", ".join(members[:-1]) + " or " if len(members) > 1 else "") + members[-1])
    return one_line("; ".join(f"{path}: {message}" if path else message
                              for path, messages in parts.items() for message in dict.fromkeys(messages)))


_UNION_MEMBERS = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false"}


def one_line(text: str) -> str:
    """``text`` with its line breaks made blanks: an error is reported as a single line."""
    return " ".join(text.split())


def files_problem(pattern: str) -> str | None:
    """Why a ``files`` pattern could leave the landing folder (absolute, home-relative or with '..'), if so."""
    if pattern.startswith(("/", "\\", "~")) or PurePath(pattern).is_absolute() or re.match(r"[A-Za-z]:[/\\]", pattern):
        return (f"{pattern!r} is an absolute path; files are relative to landing_dir (make landing_dir the folder "
                "that holds them)")
    if ".." in re.split(r"[/\\]", pattern):
        return f"{pattern!r} leaves the landing folder ('..'); files must be inside landing_dir"
    return None


def format_problem(fmt: str) -> str | None:
    """Why a timestamp format cannot work, if so: no % directive (a placeholder like YYYY-MM-DD) or a bad one."""
    if fmt in PANDAS_FORMATS:
        return None
    if "%" not in fmt:
        return f"format {fmt!r} has no % directive (a strptime format such as '%d.%m.%Y %H:%M')"
    import pandas as pd

    try:  # pandas parses the column with this format, so ask pandas (a bad directive fails whatever the value)
        pd.to_datetime(pd.Series(["0"]), format=fmt, errors="coerce")
    except ValueError as exc:
        return f"format {fmt!r}: {exc}"
    return None


def entity_problems(entity: str, source: EntitySource, entities: dict[str, EntitySource]) -> list[str]:
    """What is wrong with the columns one entity's keys name, each as "entities.<entity>.<key path>: what".

    ``columns``, ``defaults``, ``regex_replace``, ``compose`` (its target), ``pii``, ``not_personal`` and
    ``derive.columns`` name canonical or kept columns; ``types`` only kept ones; ``keep`` only extra ones;
    ``formats`` only timestamp columns. Compose parts may be source columns, so only ingest can check them.
    """
    at = f"entities.{entity}"
    canonical = CANONICAL_COLUMNS[entity]
    known: dict[str, str] = {**{c: source.types.get(c, "string") for c in source.keep}, **canonical}

    def unknown(column: str) -> str:
        return (f"{entity} has no column {column!r} (canonical: {', '.join(canonical)}; kept: "
                f"{', '.join(source.keep) or 'none'})")

    problems = []
    for column in source.keep:
        if column in canonical:
            problems.append(f"{at}.keep: {column!r} is a canonical column of {entity}; keep is for extra columns")
        elif column.startswith("_"):
            problems.append(f"{at}.keep: {column!r}: names starting with '_' are reserved for lineage columns")
    problems += [f"{at}.types.{column}: types apply to kept columns, and {column!r} is not in keep"
                 for column in source.types if column not in source.keep]
    for key in ("columns", "defaults", "regex_replace", "compose"):
        problems += [f"{at}.{key}.{column}: {unknown(column)}" for column in getattr(source, key)
                     if column not in known]
    for key in ("pii", "not_personal"):
        problems += [f"{at}.{key}: {unknown(column)}" for column in getattr(source, key) if column not in known]
    problems += [f"{at}.pii: {column!r} is a key joining the entities and cannot be pseudonymised (the joins would "
                 "break): export a non-personal id" for column in source.pii if column in KEY_COLUMNS]
    if entity != "order_lines":
        problems += [f"{at}.{option}: only order_lines have it" for option in ("unit_price_is_line_total",
                     "cancellation_prefix") if getattr(source, option) not in (None, False)]
    if source.daily and source.files is None:
        problems.append(f"{at}.daily: only files can be daily")
    problems += lookup_problems(entity, source, known, unknown)
    if both := [column for column in source.not_personal if column in source.pii]:
        problems.append(f"{at}.not_personal: {', '.join(both)} also listed in pii")
    for column, fmt in source.formats.items():
        if column not in known:
            problems.append(f"{at}.formats.{column}: {unknown(column)}")
        elif known[column] != "timestamp":
            problems.append(f"{at}.formats.{column}: {column!r} is typed {known[column]}; formats are for "
                            "timestamp columns")
        elif problem := format_problem(fmt):
            problems.append(f"{at}.formats.{column}: {problem}")
    if source.derive is not None and (origin := entities.get(source.derive.from_entity)) is not None:
        readable = set(CANONICAL_COLUMNS[source.derive.from_entity]) | set(origin.keep) | set(LINEAGE_COLUMNS)
        key = DERIVED_KEYS.get(entity)
        if key is None:
            problems.append(f"{at}.derive: only {' and '.join(DERIVED_KEYS)} can be derived (one row per key)")
        elif key not in readable:
            problems.append(f"{at}.derive.from: {source.derive.from_entity} has no {key} column to derive {entity} "
                            "from")
        for target, spec in source.derive.columns.items():
            how, column = spec.split(":", 1)
            if target not in known:
                problems.append(f"{at}.derive.columns.{target}: {unknown(target)}")
            elif how != "const" and column not in readable:
                problems.append(f"{at}.derive.columns.{target}: {source.derive.from_entity} has no column {column!r}")
    return problems


def lookup_problems(entity: str, source: EntitySource, known: dict[str, str], unknown: Any) -> list[str]:
    """What is wrong with an entity's lookups and discount: unknown target columns, a column that two places
    fill in, a lookup on a derived entity."""
    at = f"entities.{entity}"
    problems = []
    if source.lookup and source.derive is not None:
        problems.append(f"{at}.lookup: a derived entity takes its columns from its origin, not from lookups")
    filled = {c: "columns" for c in source.columns} | {c: "defaults" for c in source.defaults} | {
        c: "compose" for c in source.compose}
    for position, lookup in enumerate(source.lookup):
        for column in lookup.columns:
            where = f"{at}.lookup[{position}].columns.{column}"
            if column not in known:
                problems.append(f"{where}: {unknown(column)}")
            elif column in filled:
                problems.append(f"{where}: {column!r} is filled by {filled[column]} too; give it one origin")
            filled[column] = f"lookup {lookup.what!r}"
    if source.discount is not None and entity != "order_lines":
        problems.append(f"{at}.discount: only order_lines have it")
    if (spec := source.identity) is not None:
        if entity != "customers":
            problems.append(f"{at}.identity: only customers have it")
        columns = set(known) | {c for s in source.sources.values() for c in s.keep}
        problems += [f"{at}.identity.keys.{column}: {unknown(column)}" for column in spec.keys
                     if column not in columns]
        problems += [f"{at}.identity.precedence: {name!r} is not one of the sources {list(source.sources)}"
                     for name in spec.precedence if name not in source.sources]
    return problems


def mapping_fingerprint(mapping: str | Path) -> str:
    """A hash of the mapping file's text: part of the cache key of every stage the mapping shapes."""
    import hashlib

    return hashlib.sha256(resolve_mapping_path(mapping).read_bytes()).hexdigest()[:16]


def select_files(landing: Path, source: EntitySource, as_of: date, entity: str = "") -> list[Path]:
    """The files of one entity, sorted; for daily files only those dated on or before ``as_of``.

    Every file must be inside the landing folder once links are followed (a link out of it is refused), and at
    least one must match: an empty selection is a ``MissingInputError`` naming the pattern and the folder.
    """
    where = f"{entity}: " if entity else ""
    pattern = expand_env(source.files or "")
    if problem := files_problem(pattern):  # checked at load too, but ${VAR} expands only now
        raise MappingError(f"{where}files: {problem}")
    root = landing.resolve()
    candidates = sorted(p for p in landing.glob(pattern) if p.is_file())
    for path in candidates:
        if not path.resolve().is_relative_to(root):
            raise InputError(f"{where}{path.relative_to(landing)} (matched by files {source.files!r}) is a link to a "
                             f"file outside the landing folder {landing}; only files inside it are read")
    if not candidates:
        hint = (" (the folder does not exist)" if not landing.is_dir()
                else f" ({pattern!r} is a folder: name its files, e.g. '{pattern.rstrip('/')}/*.csv')"
                if (landing / pattern).is_dir() else "")
        raise MissingInputError(f"{where}no file matches files {source.files!r} under {landing}{hint}")
    if not source.daily:
        return candidates
    dated = []
    for path in candidates:
        try:
            dated.append((date.fromisoformat(path.name[:10]), path))
        except ValueError:
            raise MappingError(f"{where}daily file {path.relative_to(landing)} does not start with a YYYY-MM-DD "
                               "date") from None
    selected = [path for day, path in dated if day <= as_of]
    if not selected:
        raise MissingInputError(f"{where}no file of files {source.files!r} under {landing} is dated on or before "
                                f"{as_of} (the earliest is dated {min(day for day, _ in dated)})")
    return selected
