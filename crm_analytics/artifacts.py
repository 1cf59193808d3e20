"""The artifact store: the only module that knows the run-folder layout and how files are written.

Layout: ``<data_root>/runs/as_of=YYYY-MM-DD/<stage>/<name>.<ext>`` with ``_manifest.json`` written last.
Every write goes to a hidden temporary file in the same folder and is renamed into place, so a reader never
sees a half-written artifact. A partitioned table (``write_partitioned``: the order lines, split by customer)
is a folder ``<stage>/<name>.parquet/`` of ``part-NNNNN.parquet`` files and a ``_metadata`` file, written in a
hidden temporary folder and renamed into place whole. Stages exchange :class:`ArtifactRef` objects (path,
rows, schema fingerprint, content hash), never DataFrames: Prefect results stay tiny and cache keys are exact.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

import crm_analytics
from crm_analytics.errors import PermanentError

MANIFEST_NAME = "_manifest.json"
STAGE_RECORDS = "_stages"
TRASH_PREFIX = ".trash-"  # a run folder being deleted: hidden, so no reader lists it
STAGES = ("raw", "validated", "quarantine", "clean", "features", "segments", "churn", "rules", "value",
          "forecast", "report")


class ArtifactRef(BaseModel):
    """A pointer to one written artifact; what tasks pass to each other."""

    stage: str
    name: str
    path: str
    kind: str  # "parquet", "json", "model", "png", "markdown"
    rows: int | None = None
    schema_fingerprint: str | None = None
    content_hash: str
    bytes: int
    # A partitioned table: its part files (relative to the dataset folder), in part order; ``path`` is then the
    # folder's ``_metadata`` file, which ``pq.read_schema``/``pq.read_metadata`` read as the whole table's
    # schema and row count (reading rows from it fails loudly: use ``RunStore.read_frame``).
    parts: list[str] | None = None
    # The row order of the table as one frame (``RunStore.read_frame`` restores it over the parts).
    sort_by: list[str] | None = None

    @property
    def file(self) -> Path:
        return Path(self.path)

    @property
    def part_files(self) -> list[Path]:
        """The files holding the rows, in order: the parts of a partitioned table, else the file itself."""
        return [self.file.parent / part for part in self.parts] if self.parts is not None else [self.file]

    def manifest_entry(self, relative_path: str) -> dict[str, Any]:
        """What the manifest records of this artifact (``RunStore.artifact`` rebuilds the ref from it)."""
        entry = {"path": relative_path, "kind": self.kind, "rows": self.rows,
                 "schema_fingerprint": self.schema_fingerprint, "content_hash": self.content_hash,
                 "bytes": self.bytes}
        if self.parts is not None:
            entry.update(parts=self.parts, sort_by=self.sort_by)
        return entry


class StageResult(BaseModel):
    """What a stage task returns: its artifacts and the counts a person or the manifest needs."""

    stage: str
    artifacts: dict[str, ArtifactRef]
    metrics: dict[str, Any] = {}
    report_section: str = ""  # Markdown: what a person should read about this stage tonight

    @property
    def figures(self) -> list[ArtifactRef]:
        return [ref for ref in self.artifacts.values() if ref.kind == "png"]

    def ref(self, name: str) -> ArtifactRef:
        try:
            return self.artifacts[name]
        except KeyError:
            raise KeyError(f"stage {self.stage!r} has no artifact {name!r}; it has {sorted(self.artifacts)}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DATASET_METADATA = "_metadata"  # the schema, row groups and row count of every part of a partitioned table
SORT_BY_KEY = b"crm_analytics.sort_by"  # in the _metadata file's schema: the ref's ``sort_by``, as JSON


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def dataset_hash(folder: Path, parts: list[str]) -> str:
    """The content hash of a partitioned table: of every part's name and hash, in part order (deterministic:
    the same rows in the same parts give the same hash)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\t{file_sha256(folder / part)}\n".encode())
    return digest.hexdigest()


def is_intact(ref: ArtifactRef) -> bool:
    """Whether an artifact's files are still on disk with the size and content hash recorded."""
    files = ref.part_files
    if not ref.file.exists() or not all(f.exists() for f in files) or sum(f.stat().st_size for f in files) != ref.bytes:
        return False
    content = dataset_hash(ref.file.parent, ref.parts) if ref.parts is not None else file_sha256(ref.file)
    return content == ref.content_hash


def schema_fingerprint(schema: pa.Schema) -> str:
    """A short hash of column names and types (not metadata), to spot schema drift between runs."""
    text = ";".join(f"{field.name}:{field.type}" for field in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; put it in ``target``'s place only if the block succeeds.

    A folder cannot be renamed onto a non-empty one: an old ``target`` (a rerun's) is first renamed to a hidden
    trash name, so readers see the old whole folder, briefly nothing, then the new whole folder; never a part.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        trash = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        if target.exists():  # a rerun's folder, or a single file of the same name from the older layout
            os.rename(target, trash)
        try:
            os.rename(tmp, target)
        except OSError:
            if trash.exists():
                os.rename(trash, target)  # put the previous whole table back
            raise
        if trash.is_dir():
            shutil.rmtree(trash)
        else:
            trash.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class RunLockedError(PermanentError, RuntimeError):
    """Another run of the same as-of date holds the run folder (reported as one line: nothing is broken)."""


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the pipeline's code and suites: a stage is recomputed whenever any of it changes.

    Deliberately coarse (the whole tree, not one module): a stage's output also depends on the helpers and
    stages it imports, and a needless recompute is cheap next to a wrong cache hit.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder, pattern in (("crm_analytics", "**/*.py"), ("tasks", "**/*.py"), ("expectations", "*.json")):
        for path in sorted((root / folder).glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The package version plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{crm_analytics.__version__}+{commit}"


@dataclass(frozen=True)
class PruneDecision:
    """What ``RunStore.prune`` does (or, in a dry run, would do) with one run folder, and why."""

    as_of: date
    delete: bool
    reason: str
    bytes: int
    complete: bool


def _as_table(piece: pd.DataFrame | pa.Table, schema: pa.Schema | None) -> pa.Table:
    if isinstance(piece, pa.Table):
        return piece if schema is None else piece.cast(schema)
    return pa.Table.from_pandas(piece, schema=schema, preserve_index=False)


class PartitionedWriter:
    """The parts of a partitioned table being written in a hidden folder (``RunStore.partitioned_writer``): a
    part's file is open from its first non-empty piece until ``finish``; one schema for every part (the given
    one, else the first non-empty piece's, which also shows the column types an empty pandas piece cannot)."""

    def __init__(self, folder: Path, schema: pa.Schema | None, partitions: int | None):
        self.folder, self.schema, self.partitions = folder, schema, partitions
        self.pinned: pa.Schema | None = None  # the schema (with its pandas metadata) every part is written with
        self.first_inferred: pa.Schema | None = None
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.collected: dict[int, list] = {}
        self.rows = 0
        self.ref: ArtifactRef | None = None

    def append(self, index: int, piece: pd.DataFrame | pa.Table) -> None:
        """Add ``piece``'s rows at the end of part ``index``."""
        table = _as_table(piece, self.schema)
        self.first_inferred = table.schema if self.first_inferred is None else self.first_inferred
        if self.pinned is None and self.schema is None and table.num_rows == 0:
            return  # an empty part is written in finish, once a non-empty piece shows the columns' types
        if self.pinned is None:
            self.pinned = table.schema
        elif not table.schema.equals(self.pinned, check_metadata=False):
            table = table.cast(self.pinned)  # null-typed columns of an empty piece; anything else raises
        if index not in self.writers:
            if table.num_rows == 0:
                return  # written in finish as an empty part, the same file as write_table of an empty table
            self.collected[index] = []
            self.writers[index] = pq.ParquetWriter(self.folder / part_name(index), self.pinned, compression="zstd",
                                                   metadata_collector=self.collected[index])
        if table.num_rows:
            self.writers[index].write_table(table.replace_schema_metadata(self.pinned.metadata))
            self.rows += table.num_rows

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def finish(self, stage: str, name: str, target: Path, sort_by: list[str] | None) -> None:
        """Close the parts, write the empty ones and ``_metadata``; ``ref`` is the table once renamed to ``target``."""
        if self.partitions is None or self.first_inferred is None:
            raise ValueError(f"{stage}/{name}: a partitioned table needs at least one part")
        if self.writers and max(self.writers) >= self.partitions:
            raise ValueError(f"{stage}/{name}: part {max(self.writers)} of a table of {self.partitions} parts")
        for writer in self.writers.values():
            writer.close()
        pinned = self.pinned or self.schema or self.first_inferred  # every part empty: their types are all there is
        names = [part_name(index) for index in range(self.partitions)]
        for index in range(self.partitions):
            if index not in self.writers:
                self.collected[index] = []
                pq.write_table(pinned.empty_table(), self.folder / names[index], compression="zstd",
                               metadata_collector=self.collected[index])
            self.collected[index][0].set_file_path(names[index])
        # The row order is also kept in the folder itself, for a reader that finds it by the layout.
        described = pinned.with_metadata({**(pinned.metadata or {}), SORT_BY_KEY: json.dumps(sort_by)})
        pq.write_metadata(described, self.folder / DATASET_METADATA,
                          metadata_collector=[self.collected[i][0] for i in range(self.partitions)])
        self.ref = ArtifactRef(stage=stage, name=name, path=str(target / DATASET_METADATA), kind="parquet",
                               rows=self.rows, schema_fingerprint=schema_fingerprint(pinned),
                               content_hash=dataset_hash(self.folder, names),
                               bytes=sum((self.folder / n).stat().st_size for n in names), parts=names,
                               sort_by=sort_by)


ROW_GROUP_ROWS = 1 << 20  # pq.write_table's default row group: a table written piece by piece gets a whole write's


class TableWriter:
    """One Parquet file written piece by piece (``RunStore.table_writer``), in row groups of ``ROW_GROUP_ROWS``
    rows as ``pq.write_table`` cuts one whole table, so the file holds the same bytes as a write of the pieces'
    concatenation. One schema: ``schema`` if given (or set before the first piece), else the first non-empty
    piece's (an empty pandas piece cannot show its column types); other pieces are cast to it."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path, self.schema = path, schema
        self.writer: pq.ParquetWriter | None = None
        self.first_inferred: pa.Schema | None = None
        self.pending: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0
        self.closed = False
        self.ref: ArtifactRef | None = None

    def append(self, piece: pd.DataFrame | pa.Table) -> None:
        table = _as_table(piece, None)
        self.first_inferred = table.schema if self.first_inferred is None else self.first_inferred
        if table.num_rows == 0:
            return  # adds nothing; an all-empty table is written by close
        if self.schema is None:
            self.schema = table.schema
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema)  # e.g. a column all null in one piece; anything else raises
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.pending.append(table.replace_schema_metadata(self.schema.metadata))
        self.buffered += table.num_rows
        self.rows += table.num_rows
        while self.buffered >= ROW_GROUP_ROWS:
            held = pa.concat_tables(self.pending)
            self.writer.write_table(held.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
            rest = held.slice(ROW_GROUP_ROWS)
            self.pending, self.buffered = [rest], rest.num_rows

    def close(self) -> tuple[int, pa.Schema]:
        """Write the last row group and close the file (again: nothing); the rows and schema written."""
        if self.closed:
            return self.rows, self.schema
        if self.writer is None:
            self.schema = self.schema or self.first_inferred  # every piece was empty: as write_frame of one
            if self.schema is None:
                raise ValueError(f"{self.path.name}: a table needs a schema or at least one piece")
            pq.write_table(self.schema.empty_table(), self.path, compression="zstd")
        else:
            if self.buffered:
                self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_ROWS)
            self.writer.close()
        self.pending, self.closed = [], True
        return self.rows, self.schema


class RunStore:
    """Reads and writes the artifacts of one run (one as-of date)."""

    def __init__(self, data_root: Path, as_of: date):
        self.data_root = Path(data_root)
        self.as_of = as_of
        self.run_dir = self.runs_dir(self.data_root) / f"as_of={as_of.isoformat()}"

    # ---- layout -------------------------------------------------------------------------------------
    def path(self, stage: str, filename: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        return self.run_dir / stage / filename

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / MANIFEST_NAME

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    @staticmethod
    def runs_dir(data_root: Path) -> Path:
        return Path(data_root) / "runs"

    @classmethod
    def complete_dates(cls, data_root: Path) -> list[date]:
        """The as-of dates of every complete run (one with a manifest) under ``data_root``, oldest first."""
        dates = []
        for manifest in cls.runs_dir(data_root).glob(f"as_of=*/{MANIFEST_NAME}"):
            try:
                dates.append(date.fromisoformat(manifest.parent.name.removeprefix("as_of=")))
            except ValueError:
                continue
        return sorted(dates)

    @classmethod
    def latest_complete(cls, data_root: Path, before: date | None = None) -> RunStore | None:
        """The latest complete run under ``data_root`` (dated before ``before`` if given), if any."""
        dates = [d for d in cls.complete_dates(data_root) if before is None or d < before]
        return cls(data_root, dates[-1]) if dates else None

    @classmethod
    def run_folders(cls, data_root: Path) -> list[RunStore]:
        """Every run folder under ``data_root``, complete or not, oldest as-of date first."""
        stores = []
        for folder in cls.runs_dir(data_root).glob("as_of=*"):
            try:
                stores.append(cls(data_root, date.fromisoformat(folder.name.removeprefix("as_of="))))
            except ValueError:
                continue
        return sorted(stores, key=lambda store: store.as_of)

    def previous_complete(self) -> RunStore | None:
        """The latest complete run dated before this one, if any.

        Stages that carry state from night to night (segment identities, the churn champion) read it.
        """
        return self.latest_complete(self.data_root, before=self.as_of)

    def completed_key(self) -> str | None:
        """The idempotency key recorded by this run if it is complete (see ``parameters.idempotency_key``)."""
        return self.read_manifest().get("idempotency_key") if self.is_complete() else None

    def artifact(self, folder: str, name: str, filename: str | None = None) -> ArtifactRef | None:
        """A table or JSON artifact of this complete run, by the folder its stage writes (``raw``, ``segments``,
        ``churn``, ...) and its name, as its manifest recorded it; ``None`` if the run is incomplete or has none.
        How a later run reads an earlier run's outputs without knowing where they lie. A run folder whose
        manifest does not list it (written by hand, or before manifests listed artifacts) is read by the layout:
        ``<name>.parquet``, ``<name>.json``, or ``filename`` for an artifact written under another file name."""
        if not self.is_complete():
            return None
        recorded = self.read_manifest().get("artifacts", {}).get(f"{folder}/{name}")
        if recorded is not None:
            return ArtifactRef(stage=folder, name=name, path=str(self.run_dir / recorded["path"]),
                               **{k: recorded[k] for k in ("kind", "rows", "schema_fingerprint", "content_hash",
                                                           "bytes")},
                               parts=recorded.get("parts"), sort_by=recorded.get("sort_by"))
        if filename is not None and (named := self.path(folder, filename)).exists():
            kind = {".parquet": "parquet", ".json": "json", ".skops": "model"}.get(named.suffix, named.suffix[1:])
            return self._ref(folder, name, named, kind)
        if (metadata := self.path(folder, f"{name}.parquet") / DATASET_METADATA).exists():
            parts = sorted(p.name for p in metadata.parent.glob("part-*.parquet"))
            sort_by = json.loads((pq.read_schema(metadata).metadata or {}).get(SORT_BY_KEY, b"null"))
            return ArtifactRef(stage=folder, name=name, path=str(metadata), kind="parquet", parts=parts,
                               sort_by=sort_by, rows=pq.read_metadata(metadata).num_rows,
                               schema_fingerprint=schema_fingerprint(pq.read_schema(metadata)),
                               content_hash=dataset_hash(metadata.parent, parts),
                               bytes=sum((metadata.parent / p).stat().st_size for p in parts))
        if (table := self.path(folder, f"{name}.parquet")).is_file():
            schema = pq.read_schema(table)
            return self._ref(folder, name, table, "parquet", rows=pq.read_metadata(table).num_rows,
                             schema_fingerprint=schema_fingerprint(schema))
        if (document := self.path(folder, f"{name}.json")).exists():
            return self._ref(folder, name, document, "json")
        return None

    # ---- stage records: what makes a stage resumable -------------------------------------------------------
    def stage_record_path(self, stage: str) -> Path:
        return self.run_dir / STAGE_RECORDS / f"{stage}.json"

    def record_stage(self, stage: str, key: str, result: StageResult) -> None:
        """Remember that ``stage`` produced ``result`` from inputs whose fingerprint is ``key``."""
        with atomic_path(self.stage_record_path(stage)) as tmp:
            tmp.write_text(json.dumps({"key": key, "finished_at": utc_now(),
                                       "result": result.model_dump(mode="json")}, indent=2))

    def recorded_stage(self, stage: str, key: str) -> StageResult | None:
        """The recorded result of ``stage`` if its key matches and every output is still intact on disk."""
        path = self.stage_record_path(stage)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("key") != key:
            return None
        result = StageResult.model_validate(record["result"])
        return result if all(is_intact(ref) for ref in result.artifacts.values()) else None

    @property
    def lock_path(self) -> Path:
        return self.data_root / "runs" / ".locks" / f"as_of={self.as_of.isoformat()}.lock"

    @contextmanager
    def lock_if_free(self) -> Iterator[bool]:
        """Hold the date's lock if no run holds it (yields True), without waiting; yields False if one does."""
        if not self.lock_path.exists():  # no run of this date ever started here: nothing can hold it
            yield True
            return
        with self.lock_path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True  # released when the handle closes

    def finished_at(self) -> datetime:
        """When the run was made: its manifest's ``finished_at``, else (incomplete) the folder's last change."""
        if self.is_complete():
            finished = self.read_manifest().get("finished_at")
            if finished:
                stamp = datetime.fromisoformat(finished)
                return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)  # a hand-written naive time: UTC
        return datetime.fromtimestamp(self.run_dir.stat().st_mtime, UTC)

    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.run_dir.rglob("*") if path.is_file())

    @classmethod
    def prune(cls, data_root: Path, keep_last: int, keep_days: int, dry_run: bool = False,
              now: datetime | None = None) -> tuple[list[PruneDecision], list[Path]]:
        """Delete old run folders whole; returns the decision on every run folder and the trash folders of an
        earlier, interrupted prune that were (or, in a dry run, would be) removed.

        Kept: a run in progress (its date is locked) and the complete run it reads as its previous one; the
        latest complete run (the next run reads its segment identities, churn champion and ingested rows); an
        incomplete run dated after it (a rerun resumes from its stage records); the ``keep_last`` latest
        complete runs; any run made in the last ``keep_days`` days. Everything else goes. A folder is first
        renamed, atomically and under its date's lock, to a hidden trash name, then deleted: a reader sees it
        whole with its manifest or not at all, and a prune killed half-way leaves only a trash folder, which
        the next prune removes.
        """
        runs_dir = cls.runs_dir(data_root)
        leftovers = sorted(runs_dir.glob(f"{TRASH_PREFIX}*")) if runs_dir.is_dir() else []
        if not dry_run:
            for trash in leftovers:
                shutil.rmtree(trash)
        now = now or datetime.now(UTC)
        runs = cls.run_folders(data_root)
        complete = [run for run in runs if run.is_complete()]
        latest = complete[-1].as_of if complete else None
        recent = {run.as_of for run in complete[-keep_last:]} if keep_last > 0 else set()
        locked = set()
        for run in runs:
            with run.lock_if_free() as free:
                if not free:
                    locked.add(run.as_of)
        read_by_running = {previous.as_of for run in runs if run.as_of in locked
                           if (previous := run.previous_complete()) is not None}
        decisions = []
        for run in runs:
            done = run.is_complete()
            if run.as_of in locked:
                reason = "a run of this date is in progress (its lock is held)"
            elif run.as_of == latest:
                reason = "the latest complete run: the next run reads its segments, churn champion and raw rows"
            elif run.as_of in read_by_running:
                reason = "a run in progress reads it as its previous complete run"
            elif not done and (latest is None or run.as_of > latest):
                reason = "incomplete and newer than the latest complete run: a rerun resumes it"
            elif run.as_of in recent:
                reason = f"one of the {keep_last} latest complete runs"
            elif run.finished_at() > now - timedelta(days=keep_days):
                reason = f"made in the last {keep_days} days"
            else:
                reason = ("complete" if done else "incomplete (failed or interrupted)") + (
                    f", older than {keep_days} days and not among the {keep_last} latest complete runs")
                decisions.append(PruneDecision(run.as_of, True, reason, run.disk_bytes(), done))
                continue
            decisions.append(PruneDecision(run.as_of, False, reason, run.disk_bytes(), done))
        if dry_run:
            return decisions, leftovers
        return [decision if not decision.delete else cls(data_root, decision.as_of)._delete(decision)
                for decision in decisions], leftovers

    def _delete(self, decision: PruneDecision) -> PruneDecision:
        """Rename the folder to a hidden trash name under the date's lock, then delete the trash."""
        with self.lock_if_free() as free:
            if not free:  # a run of the date started since the plan was made
                return PruneDecision(self.as_of, False, "a run of this date started: kept", decision.bytes,
                                     decision.complete)
            trash = self.run_dir.with_name(f"{TRASH_PREFIX}{self.run_dir.name}.{uuid.uuid4().hex}")
            os.rename(self.run_dir, trash)
        shutil.rmtree(trash)
        return decision

    @contextmanager
    def lock(self, timeout_seconds: float = 3600.0, poll_seconds: float = 1.0,
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the as-of date exclusively (an OS file lock, released if the process dies).

        A second run of the same date waits (up to ``timeout_seconds``); runs of other dates are not affected.
        """
        lock_path = self.lock_path
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+")
        deadline = time.monotonic() + timeout_seconds
        warned = False
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RunLockedError(f"another run of {self.as_of} still holds {lock_path} after "
                                             f"{timeout_seconds:.0f}s") from None
                    if on_wait and not warned:
                        on_wait(f"another run of {self.as_of} holds the run folder; waiting for it to finish")
                        warned = True
                    time.sleep(poll_seconds)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {utc_now()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # closing the descriptor releases the lock

    def begin(self) -> None:
        """Mark the run as in progress: a rerun first withdraws the old manifest, so the folder reads as
        incomplete until the new manifest lands."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path.unlink(missing_ok=True)

    # ---- writes -------------------------------------------------------------------------------------
    def _ref(self, stage: str, name: str, path: Path, kind: str, **extra: Any) -> ArtifactRef:
        return ArtifactRef(
            stage=stage,
            name=name,
            path=str(path),
            kind=kind,
            content_hash=file_sha256(path),
            bytes=path.stat().st_size,
            **extra,
        )

    def write_frame(self, stage: str, name: str, frame: pd.DataFrame, schema: pa.Schema | None = None) -> ArtifactRef:
        """Write a table; ``schema`` pins column types an empty frame cannot show (e.g. list<string>)."""
        target = self.path(stage, f"{name}.parquet")
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return self._ref(
            stage, name, target, "parquet", rows=table.num_rows, schema_fingerprint=schema_fingerprint(table.schema)
        )

    def write_partitioned(self, stage: str, name: str, parts: Iterable[pd.DataFrame | pa.Table],
                          schema: pa.Schema | None = None, sort_by: list[str] | None = None) -> ArtifactRef:
        """Write a table as a folder of parts, each written as ``parts`` yields it (the caller holds one part at a
        time); the folder appears whole or not at all (``atomic_folder``).

        Every part gets one schema: ``schema`` if given, else the first non-empty part's (an empty pandas part
        cannot show its column types; it is written with that schema once known). ``sort_by`` names the row
        order the table has as one frame: each part must already be in it, and ``read_frame`` restores it
        over the parts. Empty parts are written too, so part ``i`` is always hash partition ``i``.
        """
        with self.partitioned_writer(stage, name, schema, sort_by) as writer:
            count = 0
            for index, part in enumerate(parts):
                writer.append(index, part)
                count = index + 1
            if count == 0:
                raise ValueError(f"{stage}/{name}: a partitioned table needs at least one part")
            writer.partitions = count
        return writer.ref

    @contextmanager
    def partitioned_writer(self, stage: str, name: str, schema: pa.Schema | None = None,
                           sort_by: list[str] | None = None,
                           partitions: int | None = None) -> Iterator[PartitionedWriter]:
        """A partitioned table written piece by piece: ``append(i, piece)`` adds rows at the end of part ``i``
        (pieces of any part, in any order), so a stage can hold one batch of its input instead of the whole
        table. The rules of :meth:`write_partitioned` hold (one schema, empty parts written, ``_metadata``, the
        dataset hash, the folder renamed into place whole when the block succeeds); ``partitions`` (or the
        writer's ``partitions``, set before the block ends) is the part count. ``writer.ref`` is the artifact
        after the block."""
        target = self.path(stage, f"{name}.parquet")
        with atomic_folder(target) as folder:
            writer = PartitionedWriter(folder, schema, partitions)
            try:
                yield writer
            except BaseException:
                writer.abort()
                raise
            writer.finish(stage, name, target, sort_by)

    @contextmanager
    def table_writer(self, stage: str, name: str, schema: pa.Schema | None = None) -> Iterator[TableWriter]:
        """One Parquet table written piece by piece (``append``), renamed into place when the block succeeds (an
        error leaves no file): the same file as ``write_frame`` of the pieces' concatenation. Inside the block,
        ``close()`` finishes the file early, e.g. to read rows back from ``writer.path``; ``writer.ref`` is the
        artifact after the block."""
        target = self.path(stage, f"{name}.parquet")
        with atomic_path(target) as tmp:
            writer = TableWriter(tmp, schema)
            try:
                yield writer
            except BaseException:
                if writer.writer is not None and not writer.closed:
                    writer.writer.close()  # the file is removed with the error; the error is the caller's
                raise
            writer.close()
        writer.ref = self._ref(stage, name, target, "parquet", rows=writer.rows,
                               schema_fingerprint=schema_fingerprint(writer.schema))

    def write_json(self, stage: str, name: str, payload: Any) -> ArtifactRef:
        target = self.path(stage, f"{name}.json")
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
        return self._ref(stage, name, target, "json")

    def write_text(self, stage: str, filename: str, text: str, kind: str = "markdown") -> ArtifactRef:
        target = self.path(stage, filename)
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self._ref(stage, Path(filename).stem, target, kind)

    def write_with(self, stage: str, filename: str, kind: str, writer: Callable[[Path], None]) -> ArtifactRef:
        """Write an artifact with a caller's writer (a model serializer, a figure's savefig) atomically."""
        target = self.path(stage, filename)
        with atomic_path(target) as tmp:
            writer(tmp)
        return self._ref(stage, Path(filename).stem, target, kind)

    def write_manifest(self, payload: dict[str, Any]) -> Path:
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
        return self.manifest_path

    # ---- reads --------------------------------------------------------------------------------------
    @staticmethod
    def read_frame(ref: ArtifactRef, columns: list[str] | None = None, filters: Any = None,
                   ordered: bool = True) -> pd.DataFrame:
        """A table (or its ``columns``, and the rows passing pyarrow ``filters``) as one frame.

        A partitioned table reads as the single file it replaces: its parts concatenated, then stably sorted by
        its ``sort_by`` columns (an Arrow sort, which compares strings only among equal timestamps). Rows equal
        in every ``sort_by`` column keep their order within a customer; rows of two customers that tie on all
        of them (the same order id, time and product for two customers) may come in another order than the
        single frame had. Without ``sort_by`` (or with ``ordered=False``, for a reader that does not depend on
        the row order), the parts come one after another, each in its own order: restoring the order costs a
        sort and a gather (at 9.3M lines, ~2 s CPU and ~0.5 GB more than reading one file).
        """
        if ref.kind != "parquet":
            raise ValueError(f"artifact {ref.stage}/{ref.name} is {ref.kind}, not a table")
        if ref.parts is None:
            return pq.read_table(ref.file, columns=columns, filters=filters).to_pandas()
        keys = ref.sort_by if ordered and ref.sort_by and len(ref.parts) > 1 else []
        wanted = None if columns is None else list(dict.fromkeys([*columns, *keys]))
        table = pa.concat_tables([pq.read_table(path, columns=wanted, filters=filters) for path in ref.part_files])
        if keys:
            order = pc.sort_indices(table.select(keys), sort_keys=[(key, "ascending") for key in keys])
            table = table.select(columns) if columns is not None else table
            schema, ordered_columns = table.schema, []
            for name in schema.names:  # column by column, each released once taken: peak one column over the table
                ordered_columns.append(table.column(name).take(order))
                table = table.drop_columns([name])
            table = pa.Table.from_arrays(ordered_columns, schema=schema)
        elif columns is not None:
            table = table.select(columns)
        return table.to_pandas()

    @staticmethod
    def read_parts(ref: ArtifactRef, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """A table part by part (a file not partitioned is one part): how a stage holds one part at a time."""
        if ref.kind != "parquet":
            raise ValueError(f"artifact {ref.stage}/{ref.name} is {ref.kind}, not a table")
        for path in ref.part_files:
            yield pq.read_table(path, columns=columns).to_pandas()

    @staticmethod
    def read_batches(ref: ArtifactRef, batch_rows: int) -> Iterator[pd.DataFrame]:
        """A table about ``batch_rows`` rows at a time (no more; fewer where a file or row group ends), in its
        order; an empty table is one empty frame. How a stage holds a batch of a table that is not partitioned."""
        if ref.kind != "parquet":
            raise ValueError(f"artifact {ref.stage}/{ref.name} is {ref.kind}, not a table")
        empty = True
        for path in ref.part_files:
            file = pq.ParquetFile(path)
            for batch in file.iter_batches(batch_size=max(1, batch_rows)):
                empty = False
                yield pa.Table.from_batches([batch], schema=file.schema_arrow).to_pandas()
        if empty:
            yield pq.read_schema(ref.part_files[0]).empty_table().to_pandas()

    @staticmethod
    def table_rows(ref: ArtifactRef) -> int:
        """A table's row count, from its ref or else its files' metadata (no rows read)."""
        if ref.rows is not None:
            return ref.rows
        return sum(pq.read_metadata(path).num_rows for path in ref.part_files)

    @staticmethod
    def read_json(ref: ArtifactRef) -> Any:
        return json.loads(ref.file.read_text())

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def relative(self, ref: ArtifactRef) -> str:
        return str(Path(ref.path).relative_to(self.run_dir))


# A fixed time for every zip entry: the zip format stores each entry's write time (the earliest it can hold).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def deterministic_skops(data: bytes) -> bytes:
    """A skops file rewritten so identical models give identical bytes, loading exactly as before.

    skops names the arrays inside its zip by ``id(obj)`` (a memory address) or a random uuid, records the same
    addresses as each node's ``__id__``, and stamps every zip entry with the current time. Both kinds of name are
    renumbered in the order the schema first mentions them (so objects that shared an id still share one), and
    every entry gets a fixed time and mode.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = {info.filename: info for info in source.infolist()}
        schema = json.loads(source.read("schema.json"))
        files: dict[str, str] = {}
        ids: dict[int, int] = {}

        def renumber(node: Any) -> Any:
            if isinstance(node, list):
                return [renumber(item) for item in node]
            if not isinstance(node, dict):
                return node
            out = {}
            for key, value in node.items():
                if key == "__id__" and isinstance(value, int) and not isinstance(value, bool):
                    out[key] = ids.setdefault(value, len(ids))
                elif key == "file" and isinstance(value, str) and value in members and value != "schema.json":
                    out[key] = files.setdefault(value, f"{len(files):06d}{Path(value).suffix}")
                else:
                    out[key] = renumber(value)
            return out

        schema = renumber(schema)
        # Entries the schema does not name (none in skops' format today) keep their name, in name order.
        entries = sorted((new, old) for old, new in files.items())
        entries += sorted((old, old) for old in members if old not in files and old != "schema.json")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as target:
            for new, old in entries:
                target.writestr(_zip_entry(new, members[old]), source.read(old))
            target.writestr(_zip_entry("schema.json", members["schema.json"]), json.dumps(schema, indent=2))
    return buffer.getvalue()


def _zip_entry(name: str, like: zipfile.ZipInfo) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = like.compress_type
    info.external_attr = 0o644 << 16
    return info


def dump_skops(model: Any, path: Path) -> None:
    """Save a model with skops, byte-identical for identical models (see ``deterministic_skops``)."""
    import skops.io as sio

    Path(path).write_bytes(deterministic_skops(sio.dumps(model)))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | pd.Timestamp):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
