"""Stage options on the command line (--set, --options) checked by the UI form's model, and progress shown
on a terminal only."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from crm_analytics import progress
from crm_analytics.artifacts import StageResult
from crm_analytics.cli_options import OptionError, merged_options, parse_assignment
from crm_analytics.parameters import PipelineOptions, RunSpec

REPO = Path(__file__).resolve().parent.parent


# ---- --set and --options ----------------------------------------------------------------------------------
def test_values_are_typed_by_the_model():
    assert parse_assignment("rules.min_support=0.001") == (["rules", "min_support"], 0.001)
    options = merged_options(None, ["rules.min_support=0.001", "churn.risk_band_edges=[0.2, 0.5]",
                                    "validation.earliest_date=1980-01-01", "rules.single_consequent=false",
                                    "segments.features=[recency_days, frequency]", "churn.active_within_days="])
    assert options.rules.min_support == 0.001
    assert options.churn.risk_band_edges == [0.2, 0.5]
    assert options.validation.earliest_date == date(1980, 1, 1)
    assert options.rules.single_consequent is False
    assert options.segments.features == ["recency_days", "frequency"]
    assert options.churn.active_within_days is None
    assert options.rules.min_confidence == PipelineOptions().rules.min_confidence  # untouched: the default


def test_the_file_comes_first_then_the_flags_then_each_set(tmp_path):
    file = tmp_path / "options.yaml"
    file.write_text("mapping: cdnow\nrules: {min_support: 0.05, min_lift: 2.0}\nseed: 3\n")
    options = merged_options(file, ["rules.min_support=0.02", "rules.min_support=0.03"],
                             given={"mapping": "telco", "landing_dir": None})
    assert options.rules.min_support == 0.03  # the last --set wins
    assert options.rules.min_lift == 2.0      # the file's, nothing overrode it
    assert options.mapping == "telco"         # a given flag beats the file
    assert options.seed == 3
    assert options.landing_dir is None        # a flag not given leaves the file's (or the default)


def test_command_defaults_lie_under_the_file_and_set(tmp_path):
    defaults = {"freshness": {"on_stale": "warn"}}
    assert merged_options(defaults=defaults).freshness.on_stale == "warn"
    assert merged_options(None, ["freshness.on_stale=fail"], defaults=defaults).freshness.on_stale == "fail"
    assert defaults == {"freshness": {"on_stale": "warn"}}  # a --set never edits the command's defaults
    file = tmp_path / "o.yaml"
    file.write_text("freshness: {max_lag_days: 5}\n")
    from_file = merged_options(file, defaults=defaults).freshness
    assert (from_file.on_stale, from_file.max_lag_days) == ("warn", 5)  # merged, not replaced


@pytest.mark.parametrize(("assignments", "line"), [
    (["rules.min_support=2"], "options: rules.min_support: Input should be less than or equal to 1 "
                              "(allowed: > 0.0 and <= 1.0); got 2"),
    (["rules.min_support=abc"], "options: rules.min_support: Input should be a valid number, unable to parse "
                                "string as a number (allowed: > 0.0 and <= 1.0); got 'abc'"),
    (["rules.basket=week"], "options: rules.basket: Input should be 'order' or 'customer_day'; got 'week'"),
    (["segments.k_min=9"], "options: segments: Value error, k_min (9) must not exceed k_max (8)"),
    (["churn.horizon_days=1", "freshness.on_stale=maybe"],
     "options: churn.horizon_days: Input should be greater than or equal to 7 (allowed: >= 7 and <= 365); got 1; "
     "freshness.on_stale: Input should be 'fail' or 'warn'; got 'maybe'"),
])
def test_a_bad_value_names_the_option_and_what_it_allows(assignments, line):
    with pytest.raises(OptionError) as caught:
        merged_options(None, assignments)
    assert str(caught.value) == line


def test_an_unknown_option_lists_the_known_ones():
    with pytest.raises(OptionError, match=r"^options: rules.min_suport: unknown option \(known here: basket, "
                                          r"item_level, .*min_support.*\)$"):
        merged_options(None, ["rules.min_suport=0.1"])
    with pytest.raises(OptionError, match=r"^options: rulez: unknown option \(known here: churn, data_root, forecast, "
                                          r"freshness, .*\)$"):
        merged_options(None, ["rulez.min_support=0.1"])


def test_malformed_assignments_and_files_are_one_line(tmp_path):
    with pytest.raises(OptionError, match=r"^--set 'min_support': expected section.field=value"):
        merged_options(None, ["min_support"])
    with pytest.raises(OptionError, match=r"^--set 'rules..x=1': expected section.field=value"):
        merged_options(None, ["rules..x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  min_support: [0.1\n")
    with pytest.raises(OptionError, match=rf"^--options {bad} line \d: not valid YAML"):
        merged_options(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- rules\n")
    with pytest.raises(OptionError, match="expected a mapping of sections"):
        merged_options(listed)
    with pytest.raises(OptionError, match=r"--options .*absent.yaml: No such file or directory"):
        merged_options(tmp_path / "absent.yaml")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crm_analytics.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.parametrize("command", [["run", "--as-of", "2025-12-31"],
                                     ["backfill", "--start", "2025-12-01", "--end", "2025-12-02"]])
def test_a_bad_value_through_the_command_is_one_line_and_no_run(tmp_path, command):
    done = _cli(*command, "--data-root", str(tmp_path), "--set", "rules.min_support=0", "--set",
                "rules.top_n=7")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: options: rules.min_support: Input should be greater than 0 "
                                        "(allowed: > 0.0 and <= 1.0); got 0"]
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_bad_options_file_through_the_command_is_one_line(tmp_path):
    options = tmp_path / "options.yaml"
    options.write_text("rules:\n  item_level: brand\n")
    done = _cli("run", "--as-of", "2025-12-31", "--data-root", str(tmp_path), "--options", str(options))
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: options: rules.item_level: Input should be 'product' or "
                                        "'category'; got 'brand'"]


# ---- progress -----------------------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_on_a_terminal_only():
    terminal, pipe = Terminal(), io.StringIO()
    with progress.shown_on_terminal(terminal) as shown:
        progress.note("writing 10 daily files")
    assert shown and terminal.getvalue().endswith("s] writing 10 daily files\n")
    with progress.shown_on_terminal(pipe) as shown:
        progress.note("writing 10 daily files")
    assert not shown and pipe.getvalue() == ""
    progress.note("outside any command")  # nobody listens: nothing happens, nothing fails
    assert terminal.getvalue().count("\n") == 1


def test_each_stage_reports_running_done_and_reused(tmp_path):
    from tasks.common import stage_task

    @stage_task("report")
    def tiny(run: RunSpec, value: int) -> StageResult:
        return StageResult(stage="report", artifacts={"n": run.store.write_json("report", "n", {"n": value})})

    run = RunSpec(data_root=tmp_path, as_of=date(2025, 1, 31))
    terminal = Terminal()
    with progress.shown_on_terminal(terminal):
        tiny.fn(run, 1)
        tiny.fn(run, 1)  # same inputs: its recorded outputs are reused
    lines = [line.split("] ", 1)[1] for line in terminal.getvalue().splitlines()]
    assert lines[0] == "2025-01-31 report: running"
    assert lines[1].startswith("2025-01-31 report: done in ")
    assert lines[2] == "2025-01-31 report: reused (inputs, parameters and code unchanged)"


def _generate_on(stdout_is_terminal: bool, root: Path) -> str:
    args = [sys.executable, "-m", "crm_analytics.cli", "generate", "--customers", "100", "--data-root", str(root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not stdout_is_terminal:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    leader, follower = pty.openpty()
    process = subprocess.Popen(args, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(60) == 0
    return b"".join(chunks).decode()


def test_generation_shows_progress_on_a_terminal_and_not_in_a_pipe(tmp_path):
    on_terminal = _generate_on(True, tmp_path / "a")
    assert "generating 100 customers and their orders" in on_terminal
    assert "daily files: 730/730 written (up to 2025-12-31)" in on_terminal
    piped = _generate_on(False, tmp_path / "b")
    assert piped.splitlines() == [line for line in piped.splitlines() if line.startswith("sample export written")]
    assert "daily files" not in piped and len(piped.splitlines()) == 1


@pytest.mark.integration
def test_a_backfill_reports_each_date_done_out_of_the_total(tmp_path, prefect_server):
    """Two dates over an empty landing folder: each fails at once in ingest, and each is counted as done."""
    from flows.backfill import BackfillFailed, backfill

    terminal = Terminal()
    with progress.shown_on_terminal(terminal), pytest.raises(BackfillFailed, match="2 of 2 dates failed"):
        backfill(start=date(2025, 3, 1), end=date(2025, 3, 2), options=PipelineOptions(data_root=str(tmp_path)))
    lines = [line.split("] ", 1)[1] for line in terminal.getvalue().splitlines()]
    assert [line for line in lines if line.startswith("backfill:")] == [
        "backfill: 1/2 dates done (2025-03-01 failed; 0 already complete)",
        "backfill: 2/2 dates done (2025-03-02 failed; 0 already complete)"]


def test_the_command_resolves_the_data_root_and_a_backfill_warns_by_default(tmp_path):
    from crm_analytics.cli import BACKFILL_DEFAULTS, _options

    file = tmp_path / "options.yaml"
    file.write_text(f"data_root: {tmp_path / 'from-file'}\n")
    assert _options(file, None, None, None, None).data_root == str(tmp_path / "from-file")
    assert _options(file, None, None, tmp_path / "flag", None).data_root == str(tmp_path / "flag")  # flag wins
    run = _options(None, None, None, tmp_path, "landing/here")
    assert (run.mapping, run.landing_dir, run.freshness.on_stale) == ("sample", str(Path("landing/here").resolve()),
                                                                      "fail")
    backfill = _options(None, None, None, tmp_path, None, defaults=BACKFILL_DEFAULTS)
    assert backfill.freshness.on_stale == "warn"
    assert _options(None, ["freshness.on_stale=fail"], None, tmp_path, None,
                    defaults=BACKFILL_DEFAULTS).freshness.on_stale == "fail"
