"""The bad-input corpus (``tests/bad_input.py``): every case meets its stated outcome, every input line is
accounted for against a count made here from the file's bytes (not by the product's parser), and no planted
personal value appears anywhere but raw/ — in written rows, reasons, error messages or logs.

Every case runs through the ingest and validation cores (fast); the cases marked ``through_flow`` also run end to
end through the ``crm-analytics`` command and the real flow on the session's Prefect server, where the one-line
error, every artifact of the run folder and Prefect's stored logs are checked the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from crm_analytics.mapping import MappingError, load_mapping
from crm_analytics.parameters import ValidationOptions
from crm_analytics.privacy import pseudonym_key
from crm_analytics.schema import QUARANTINE_REASON, SOURCE_FILE, SOURCE_LINE
from tasks.common import PermanentError
from tasks.ingest import ingest_all
from tasks.validate import check_gates, publishable_outcomes, validate_all
from tests.bad_input import CASES, Case, Export, base_export, planted_personal_values

SOURCE_LINES = "_source_lines"
USER_ERRORS = (PermanentError, MappingError)
PSEUDONYM_KEY = "corpus-test-key"


# ---- helpers the checks share ----------------------------------------------------------------------------------
def independent_data_lines(data: bytes, header: bool = True) -> int:
    """Data lines of a text file, counted here from its bytes: any of CRLF, LF or CR ends a line, an empty line
    is not data, and a last line without a line end still counts. No CSV parsing: a row merged or split by a
    parser cannot change this count."""
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines and lines[-1] == b"":
        lines.pop()
    return sum(1 for line in lines[1 if header else 0:] if line != b"")


def write_export(export: Export, root: Path) -> Path:
    landing = root / "landing"
    for name, data in export.files.items():
        (landing / name).parent.mkdir(parents=True, exist_ok=True)
        (landing / name).write_bytes(data)
    for name, target in export.symlinks.items():
        landing.mkdir(parents=True, exist_ok=True)
        (landing / name).symlink_to(target)
    mapping = {**export.mapping, "landing_dir": str(landing)}
    (root / "mapping.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    return landing


def exception_texts(exc: BaseException) -> list[str]:
    """Everything an exception can carry into a console or a log: its text, repr and args, and those of every
    exception chained to it."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc)] + [repr(arg) for arg in exc.args]
        exc = exc.__cause__ or exc.__context__
    return texts


def assert_no_personal_values(texts: list[str], where: str) -> None:
    for text in texts:
        for value in planted_personal_values():
            assert value not in text, f"planted personal value {value!r} found in {where}"


def frame_texts(frame: pd.DataFrame) -> list[str]:
    """Column names and every text cell of a frame."""
    texts = [str(c) for c in frame.columns]
    for column in frame.columns:
        values = frame[column]
        if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
            texts += list(set(values.dropna().map(str)))  # lists (rule sides) as their text
    return texts


def entity_files(export: Export) -> dict[str, list[str]]:
    """entity -> the landing files it reads (plain relative names in this corpus)."""
    files: dict[str, list[str]] = {}
    for entity, source in export.mapping["entities"].items():
        pattern = source.get("files", "")
        files[entity] = sorted(name for name in export.files if Path(name).match(pattern))
    return files


@dataclass
class Result:
    frames: dict[str, pd.DataFrame]
    valid: dict[str, pd.DataFrame]
    quarantine: dict[str, pd.DataFrame]

    def row(self, entity: str, line: int) -> pd.Series:
        rows = self.valid[entity][self.valid[entity][SOURCE_LINE] == line]
        assert len(rows) == 1, f"{entity}: expected one valid row from line {line}, found {len(rows)}"
        return rows.iloc[0]

    def assert_value(self, entity: str, line: int, column: str, expected: object) -> None:
        value = self.row(entity, line)[column]
        if isinstance(value, pd.Timestamp):
            expected = pd.Timestamp(expected)
        elif isinstance(expected, float):
            assert value == pytest.approx(expected), f"{entity} line {line} {column}: {value!r}"
            return
        assert value == expected, f"{entity} line {line} {column}: {value!r} != {expected!r}"

    def assert_column_filled(self, entity: str, column: str) -> None:
        assert self.valid[entity][column].notna().all(), f"{entity}.{column} lost values"

    def assert_no_key(self, entity: str, column: str, value: str) -> None:
        for frame in (self.valid[entity], self.quarantine[entity], self.frames[entity]):
            assert value not in set(frame[column].dropna()), f"{entity} has a row keyed {value!r}"


def check_quarantine(case: Case, result: Result) -> None:
    for entity, quarantined in result.quarantine.items():
        expected = case.outcome.quarantined.get(entity, {})
        got = dict(zip(quarantined[SOURCE_LINE].tolist(), quarantined[QUARANTINE_REASON].tolist(), strict=True))
        assert sorted(got) == sorted(expected), (
            f"{entity}: quarantined lines {sorted(got)} != expected {sorted(expected)}; reasons "
            f"{ {line: got[line] for line in sorted(set(got) - set(expected))[:5]} }")
        for line, pattern in expected.items():
            assert re.search(pattern, got[line]), f"{entity} line {line}: reason {got[line]!r} !~ {pattern!r}"


def check_reconciliation(export: Export, result: Result) -> None:
    """Lines counted here from the bytes == lines covered by valid rows + lines covered by quarantined rows."""
    for entity, names in entity_files(export).items():
        counted = sum(independent_data_lines(export.files[name]) for name in names)
        rows = pd.concat([result.valid[entity], result.quarantine[entity]])
        # one basket's items share its line: a line is covered once, however many rows it gave
        covered = int(rows.drop_duplicates([SOURCE_FILE, SOURCE_LINE])[SOURCE_LINES].sum())
        assert covered == counted, f"{entity}: {counted} data lines in the files, rows cover {covered}"


# ---- every case through the cores ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_through_ingest_and_validation(case: Case, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("CRM_PSEUDONYM_KEY", PSEUDONYM_KEY)
    caplog.set_level(logging.INFO)
    export = base_export()
    case.defect(export)
    write_export(export, tmp_path)
    no_gate = ValidationOptions(max_quarantine_rate=1.0)
    try:
        mapping = load_mapping(tmp_path / "mapping.yaml")
        frames, _ = ingest_all(mapping, tmp_path, export.as_of)
        outcomes = validate_all(frames, mapping, export.as_of, no_gate)
    except USER_ERRORS as exc:
        texts = exception_texts(exc)
        assert_no_personal_values(texts + [caplog.text], f"the error or logs of {case.name!r}")
        assert case.outcome.error, f"unexpected error: {exc}"
        assert "\n" not in str(exc), f"not one line: {exc}"
        assert re.search(case.outcome.error, str(exc)), f"{exc} !~ {case.outcome.error!r}"
        return
    assert case.outcome.error is None, f"expected an error matching {case.outcome.error!r}; the run went on"
    published = publishable_outcomes(outcomes, mapping, pseudonym_key(tmp_path))
    result = Result(frames, {e: o.valid for e, o in published.items()},
                    {e: o.quarantine for e, o in published.items()})
    check_quarantine(case, result)
    check_reconciliation(export, result)
    if case.outcome.check:
        case.outcome.check(result)
    written = [t for e in published for f in (result.valid[e], result.quarantine[e]) for t in frame_texts(f)]
    assert_no_personal_values(written + [caplog.text], f"validated/quarantine rows or logs of {case.name!r}")
    try:
        check_gates(outcomes, mapping, ValidationOptions(), export.as_of)
    except USER_ERRORS as exc:
        assert case.outcome.gate_error, f"the default gate stopped the run: {exc}"
        assert "\n" not in str(exc) and re.search(case.outcome.gate_error, str(exc)), str(exc)
        assert_no_personal_values(exception_texts(exc), f"the gate message of {case.name!r}")
    else:
        assert case.outcome.gate_error is None, "the default gate let the run go on"


def test_the_corpus_covers_the_classes_of_the_issue():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert sum(c.through_flow for c in CASES) >= 4
    assert any(c.outcome.error for c in CASES) and any(c.outcome.quarantined for c in CASES)
    assert any(c.outcome.gate_error for c in CASES)


def test_the_personal_data_scan_finds_a_planted_value_in_text_and_in_list_cells():
    from tests.bad_input import email

    frame = pd.DataFrame({"rule": [["P01", email(3)]], "n": [1]})
    with pytest.raises(AssertionError, match="planted personal value"):
        assert_no_personal_values(frame_texts(frame), "a test frame")
    with pytest.raises(AssertionError, match="planted personal value"):
        assert_no_personal_values(exception_texts(ValueError(b"x" + email(4).encode())), "an exception")


def test_the_independent_line_count_is_not_fooled_by_line_ends():
    assert independent_data_lines(b"h\na\nb\n") == 2
    assert independent_data_lines(b"h\r\na\r\n\r\nb") == 2
    assert independent_data_lines(b"h\ra\rb\r") == 2
    assert independent_data_lines(b'h\n"a\nb"\n') == 2  # a quoted line break is still two lines of the file


# ---- a handful end to end: the command line, the real flow, Prefect's logs ------------------------------------
FLOW_CASES = [c for c in CASES if c.through_flow]


def _artifact_texts(run_dir: Path) -> list[tuple[str, str]]:
    """(file, text) for every artifact of a run folder outside raw/: Parquet cells and column names read back,
    other files as text (binary ones decoded leniently)."""
    out = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if relative.parts[0] == "raw":
            continue
        if path.suffix == ".parquet":
            out += [(str(relative), text) for text in frame_texts(pq.read_table(path).to_pandas())]
        else:
            out.append((str(relative), path.read_bytes().decode("utf-8", errors="replace")))
    return out


def _prefect_logs_since(started: float) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.types import DateTime

    from tests.conftest import read_all

    with get_client(sync_client=True) as client:
        after = DateTime.fromtimestamp(started - 1)
        logs = read_all(client.read_logs, log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=after)))
    return [log.message for log in logs]


@pytest.mark.integration
@pytest.mark.parametrize("case", FLOW_CASES, ids=lambda c: c.name)
def test_case_through_the_command_line_and_the_flow(case: Case, tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    export = base_export()
    case.defect(export)
    write_export(export, tmp_path)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "CRM_PSEUDONYM_KEY": PSEUDONYM_KEY,
           "CRM_DATA_ROOT": str(tmp_path)}
    started = time.time()
    done = subprocess.run(
        # The hand-made export's orders end in November and its as-of date is 2025-12-31: that it is stale is
        # reported (tests/test_freshness.py tests the gate), and the cases test what they are about.
        [sys.executable, "-m", "crm_analytics.cli", "run", "--as-of", export.as_of.isoformat(),
         "--mapping", str(tmp_path / "mapping.yaml"), "--data-root", str(tmp_path),
         "--set", "freshness.on_stale=warn"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    console = done.stdout + done.stderr
    assert "Traceback (most recent call last)" not in console, console[-3000:]
    assert_no_personal_values([console], f"the console of {case.name!r}")
    logs = _prefect_logs_since(started)
    if not case.outcome.error:  # the run got as far as the stages: their logs are in Prefect's database
        assert any("ingested order_lines" in log for log in logs), "no log of the run found in Prefect"
    assert_no_personal_values(logs, f"Prefect's logs of {case.name!r}")
    expected_error = case.outcome.error or case.outcome.gate_error
    if expected_error:
        assert done.returncode == 1, console[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(expected_error, errors[0]), done.stderr[-3000:]
        assert not any("Traceback (most recent call last)" in log for log in logs)
    else:
        assert done.returncode == 0, console[-3000:]
    run_dir = tmp_path / "runs" / f"as_of={export.as_of}"
    for name, text in _artifact_texts(run_dir) if run_dir.exists() else []:
        assert_no_personal_values([text], f"{name} of {case.name!r}")
    if not expected_error:
        manifest = json.loads((run_dir / "_manifest.json").read_text())
        for entity, names in entity_files(export).items():
            counted = sum(independent_data_lines(export.files[name]) for name in names)
            assert manifest["reconciliation"][entity]["data_lines"] == counted
        quarantine = pq.read_table(run_dir / "quarantine" / "order_lines.parquet").to_pandas()
        expected = case.outcome.quarantined.get("order_lines", {})
        assert sorted(quarantine[SOURCE_LINE]) == sorted(expected)
        assert set(quarantine[SOURCE_FILE]) <= {"order_lines.csv"}
