"""The ``crm-analytics`` command: generate sample data, run the pipeline for a date, show a run's summary.

A user error (a bad mapping or option, a missing or malformed input, the data-quality gate, an unreachable
database) ends the command with one line ``error: ...`` on stderr and exit code 1 (2 for a misused command
line); only a bug in the pipeline prints a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from crm_analytics import progress
from crm_analytics.artifacts import RunStore
from crm_analytics.errors import PermanentError
from crm_analytics.settings import configure_prefect_defaults, get_settings
from crm_analytics.user_errors import PREFIX, user_error_line


class OneLineErrorsTyper(typer.Typer):
    """A Typer app whose commands end a user error with one ``error:`` line instead of a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            outcome = super().__call__(*args, **{**kwargs, "standalone_mode": False})
        except typer.TyperException as exc:  # click's errors: a misused command line, or no command at all
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()
            else:  # click would print the usage and a box; one line says it
                typer.secho(f"{PREFIX}{exc.format_message()}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            if type(exc).__name__ == "Abort":  # Ctrl-C or end of input at a prompt
                typer.secho(f"{PREFIX}interrupted", fg="red", err=True)
                sys.exit(130)
            if (line := user_error_line(exc)) is None:
                raise  # a bug: its traceback is what a developer needs
            typer.secho(line, fg="red", err=True)
            sys.exit(1)
        sys.exit(outcome if isinstance(outcome, int) else 0)  # standalone_mode=False returns typer.Exit's code


# Locals are never printed with a traceback: a frame's variables may hold rows of personal data.
app = OneLineErrorsTyper(help="Customer-analytics pipeline on Prefect.", no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False, pretty_exceptions_show_locals=False)


class UsageProblem(PermanentError):
    """An option's value is wrong (a date that is not a date, an unknown step)."""


def _date(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageProblem(f"{option} {text!r} is not a date YYYY-MM-DD") from None


def _prefect() -> None:
    """Prefect's defaults, and a temporary server tied to this process unless PREFECT_API_URL names one."""
    configure_prefect_defaults()
    from crm_analytics.local_server import use_local_server_unless_configured

    use_local_server_unless_configured()


DataRoot = Annotated[Path | None, typer.Option(help="Data root (default: CRM_DATA_ROOT or ./data).")]


def _data_root(data_root: Path | None) -> Path:
    return (data_root or get_settings().data_root).resolve()


Assignments = Annotated[list[str] | None, typer.Option(
    "--set", help="A stage option, section.field=value (repeatable), e.g. rules.min_support=0.001; the same "
    "options as the Prefect UI form, checked the same way.")]
OptionsFile = Annotated[Path | None, typer.Option(
    "--options", help="A YAML file of stage options, shaped like the UI form (rules: {min_support: 0.001}); "
    "--set wins over it.")]


# A backfill runs dates of history: an export that was stale, or lacked a day's file, on one of those dates
# cannot be made fresher now, so it is reported (log, report, manifest) instead of failing the date.
BACKFILL_DEFAULTS = {"freshness": {"on_stale": "warn"}}


def _options(options_file: Path | None, assignments: list[str] | None, mapping: str | None,
             data_root: Path | None, landing_dir: str | None, defaults: dict[str, Any] | None = None) -> Any:
    """The run's ``PipelineOptions`` from the options file, the command's flags and ``--set``; the data root is
    ``--data-root``, else the file's or a ``--set``, else the ``CRM_DATA_ROOT`` setting."""
    from crm_analytics.cli_options import merged_options

    given = {"mapping": mapping, "data_root": str(_data_root(data_root)) if data_root else None,
             "landing_dir": str(Path(landing_dir).resolve()) if landing_dir else None}
    options = merged_options(options_file, assignments or [], given, defaults)
    root = _data_root(Path(options.data_root) if options.data_root else None)
    return options.model_copy(update={"data_root": str(root)})


@app.command()
def generate(
    customers: Annotated[int, typer.Option(min=100, max=5_000_000, help="Number of customers.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same export.")] = 42,
    end_date: Annotated[str, typer.Option(help="Last day of the export (YYYY-MM-DD).")] = "2025-12-31",
    dirty_rate: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraction of dirty rows.")] = 0.005,
    data_root: DataRoot = None,
) -> None:
    """Write a realistic sample CRM export into <data root>/landing (and its ground truth into truth/)."""
    from crm_analytics.sample_data import GeneratorConfig
    from crm_analytics.sample_data import generate as generate_export

    root = _data_root(data_root)
    cfg = GeneratorConfig(customers=customers, seed=seed, end_date=_date(end_date, "--end-date"),
                          dirty_rate=dirty_rate)
    started = time.perf_counter()
    with progress.shown_on_terminal():
        counts = generate_export(cfg, root)
    typer.echo(f"sample export written to {root / 'landing'} in {time.perf_counter() - started:.1f}s: "
               + ", ".join(f"{k}={v}" for k, v in counts.items()))


def _run(as_of: date, options: Any) -> RunStore:
    from crm_analytics.mapping import load_mapping

    load_mapping(options.mapping)  # a wrong mapping is one line at once, before a Prefect server starts for nothing
    _prefect()
    from flows.customer_analytics import customer_analytics

    with progress.shown_on_terminal():
        progress.note(f"run {as_of}: starting")
        customer_analytics(as_of=as_of, options=options)
    return RunStore(Path(options.data_root), as_of)


@app.command()
def run(
    as_of: Annotated[str, typer.Option(help="As-of date YYYY-MM-DD (default: yesterday, UTC).")] = "",
    mapping: Annotated[str | None, typer.Option(
        help="Source mapping: shipped name or YAML path (default: the options file's, or sample).")] = None,
    landing_dir: Annotated[str | None, typer.Option(help="Overrides the mapping's landing folder.")] = None,
    data_root: DataRoot = None,
    options_file: OptionsFile = None,
    assignments: Assignments = None,
) -> None:
    """Run the whole pipeline for one as-of date."""
    options = _options(options_file, assignments, mapping, data_root, landing_dir)
    if as_of:
        day = _date(as_of, "--as-of")
    else:
        _prefect()  # before Prefect is imported: the default date asks Prefect for the scheduled start
        from flows.customer_analytics import default_as_of

        day = default_as_of()
    _print_summary(_run(day, options))


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First as-of date (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option(help="Last as-of date (YYYY-MM-DD), included when a step lands on it; "
                                          "steps keep the start's day of month.")],
    step: Annotated[str, typer.Option(help="day, week or month.")] = "day",
    concurrency: Annotated[int, typer.Option(min=1, max=8, help="Dates run at the same time.")] = 1,
    force: Annotated[bool, typer.Option(help="Rerun dates already complete with the same parameters.")] = False,
    mapping: Annotated[str | None, typer.Option(
        help="Source mapping: shipped name or YAML path (default: the options file's, or sample).")] = None,
    landing_dir: Annotated[str | None, typer.Option(help="Overrides the mapping's landing folder.")] = None,
    data_root: DataRoot = None,
    options_file: OptionsFile = None,
    assignments: Assignments = None,
    executor: Annotated[str | None, typer.Option(
        help="local, dask (one date per Dask worker) or workers (each date a run of --deployment on the work "
        "pool's workers; needs PREFECT_API_URL); default: the CRM_EXECUTOR setting.")] = None,
    dask_address: Annotated[str | None, typer.Option(
        help="Scheduler of an existing Dask cluster (tcp://host:8786); default: CRM_DASK_ADDRESS, or a "
        "LocalCluster.")] = None,
    deployment: Annotated[str, typer.Option(
        help="With --executor workers: the deployment each date runs as.")] = "customer-analytics/manual",
    only_missing: Annotated[bool, typer.Option(
        help="Run only the dates without a complete run (never run, failed or interrupted), whatever parameters "
        "the complete ones used.")] = False,
) -> None:
    """Run the pipeline for every date of a range (one visible flow run per date)."""
    if step not in ("day", "week", "month"):
        raise UsageProblem(f"--step must be day, week or month, not {step!r}")
    if executor not in (None, "local", "dask", "workers"):
        raise UsageProblem(f"--executor must be local, dask or workers, not {executor!r}")
    if executor == "workers" and not os.environ.get("PREFECT_API_URL"):
        raise UsageProblem("--executor workers needs PREFECT_API_URL: the server the work pool's workers poll")
    if force and only_missing:
        raise UsageProblem("--force and --only-missing contradict each other")
    first, last = _date(start, "--start"), _date(end, "--end")
    if last < first:
        raise UsageProblem(f"--end {last} is before --start {first}")
    options = _options(options_file, assignments, mapping, data_root, landing_dir, defaults=BACKFILL_DEFAULTS)
    from crm_analytics.mapping import load_mapping

    load_mapping(options.mapping)  # one line at once for a wrong mapping, before any server starts
    _prefect()
    from crm_analytics.distributed import ExecutorOptions
    from flows.backfill import backfill as backfill_flow

    on = ExecutorOptions(kind=executor, address=dask_address, deployment=deployment)
    with progress.shown_on_terminal():
        summary = backfill_flow(start=first, end=last, step=step, concurrency=concurrency, force=force,
                                options=options, executor=on, only_missing=only_missing)
    typer.echo(", ".join(f"{k}: {len(v)}" for k, v in summary.items()))


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=100, help="Customers in the generated sample.")] = 5_000,
    data_root: DataRoot = None,
) -> None:
    """Generate the sample export (if absent) and run the pipeline on its last day."""
    root = _data_root(data_root)
    truth = root / "truth" / "generator.json"
    if not truth.exists() or json.loads(truth.read_text())["config"]["customers"] != customers:
        generate(customers=customers, data_root=root)
    end_date = _date(json.loads(truth.read_text())["config"]["end_date"], "the generated export's end_date")
    started = time.perf_counter()
    store = _run(end_date, _options(None, None, "sample", root, None))
    typer.echo(f"pipeline finished in {time.perf_counter() - started:.0f}s")
    _print_summary(store)


@app.command()
def summary(
    as_of: Annotated[str, typer.Option(help="As-of date (default: the latest complete run).")] = "",
    data_root: DataRoot = None,
) -> None:
    """Print the summary of a complete run."""
    root = _data_root(data_root)
    store = RunStore(root, _date(as_of, "--as-of")) if as_of else RunStore.latest_complete(root)
    if store is None:
        raise UsageProblem(f"no complete run under {RunStore.runs_dir(root)}")
    if not store.is_complete():
        raise UsageProblem(f"{store.run_dir} has no manifest: the run is missing or incomplete")
    _print_summary(store)


@app.command()
def customer(
    customer_id: Annotated[str, typer.Argument(help="A customer id as in the export, or its pseudonym.")],
    as_of: Annotated[str, typer.Option(help="As-of date (default: the latest complete run).")] = "",
    history: Annotated[int, typer.Option(min=1, help="Complete runs shown in the segment history.")] = 30,
    data_root: DataRoot = None,
) -> None:
    """Print one customer's card: features, segment and its history, churn, CLV and value at risk,
    recommendations, last orders."""
    from crm_analytics.customer_card import card_run, customer_card, render_card
    from tasks.churn.model_files import run_factors

    store = card_run(_data_root(data_root), _date(as_of, "--as-of") if as_of else None)
    typer.echo(render_card(customer_card(store, customer_id, history, explain_factors=run_factors)))


@app.command()
def prune(
    keep_last: Annotated[int, typer.Option(min=1, help="Complete runs always kept, newest first.")] = 7,
    keep_days: Annotated[int, typer.Option(min=0, help="Runs made in this many days are kept.")] = 30,
    dry_run: Annotated[bool, typer.Option(help="List what would be deleted and kept; delete nothing.")] = False,
    data_root: DataRoot = None,
) -> None:
    """Delete old run folders whole (never the latest complete run, a running one, or what a run reads)."""
    root = _data_root(data_root)
    decisions, trash = RunStore.prune(root, keep_last=keep_last, keep_days=keep_days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for folder in trash:
        typer.echo(f"{verb:>12}  {folder.name}  (left by an interrupted prune)")
    for decision in decisions:
        action = verb if decision.delete else "keep"
        typer.echo(f"{action:>12}  as_of={decision.as_of}  {decision.bytes / 2**20:9.1f} MiB  {decision.reason}")
    gone = [d for d in decisions if d.delete]
    typer.echo(f"{verb} {len(gone)} of {len(decisions)} run folders ({sum(d.bytes for d in gone) / 2**20:.1f} MiB); "
               f"kept {len(decisions) - len(gone)} ({sum(d.bytes for d in decisions if not d.delete) / 2**20:.1f} "
               "MiB)")


@app.command()
def alerts(
    webhook: Annotated[str | None, typer.Option(help="URL that receives a JSON POST {subject, body}.")] = None,
    block: Annotated[str | None, typer.Option(
        help="An existing notification block instead, as <block-type-slug>/<name> (e.g. slack-webhook/ops).")] = None,
    deadline_hours: Annotated[float, typer.Option(
        min=0.003, help="Notify when a nightly run has not completed this long after a worker picked it up.")] = 4.0,
    deployment: Annotated[str, typer.Option(help="The deployment watched.")] = "customer-analytics/nightly",
) -> None:
    """Create (or replace) the automations that notify on a failed nightly and on one not completed in time."""
    from datetime import timedelta

    if not os.environ.get("PREFECT_API_URL"):
        raise UsageProblem("alerts live on a Prefect server: set PREFECT_API_URL")
    configure_prefect_defaults()
    from crm_analytics.local_server import use_local_server_unless_configured

    use_local_server_unless_configured()  # checks that the server answers, in one line if it does not
    from crm_analytics.alerts import create_alerts

    ids = create_alerts(webhook=webhook, block=block, deadline=timedelta(hours=deadline_hours), deployment=deployment)
    typer.echo(f"automations created on {os.environ['PREFECT_API_URL']}: " + ", ".join(ids))


@app.command()
def production(
    home: Annotated[Path, typer.Option(help="Folder for PostgreSQL's data, Prefect's home and the logs.")],
    data_root: DataRoot = None,
    slots: Annotated[int, typer.Option(min=1, max=64, help="Date runs the work pool runs at once.")] = 2,
    port: Annotated[int, typer.Option(help="Port of the Prefect server and UI (loopback).")] = 4200,
    database_url: Annotated[str | None, typer.Option(
        help="An existing PostgreSQL database (postgresql+asyncpg://...); default: a cluster started in HOME.")] = None,
) -> None:
    """Start PostgreSQL, a Prefect server on it, the work pool, the deployments and a worker; Ctrl-C stops them."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # A service manager stops with SIGTERM, a terminal with SIGINT (ignored in a process started in the background):
    # either ends the loop below, and leaving the stack's context stops PostgreSQL, the server and the worker.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    configure_prefect_defaults()
    from crm_analytics.production import production_stack

    with production_stack(home.resolve(), _data_root(data_root), slots=slots, database_url=database_url,
                          port=port) as stack:
        typer.echo(f"Prefect UI {stack.ui_url}; in other shells: export PREFECT_API_URL={stack.api_url}\n"
                   f"logs in {home / 'logs'} and {home / 'prefect' / 'logs'}; Ctrl-C stops everything")
        try:
            while all(service.process.poll() is None for service in stack.services):
                time.sleep(2)
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
        stopped = [service.name for service in stack.services if service.process.poll() is not None]
        raise UsageProblem(f"{', '.join(stopped)} stopped; see the logs in {home}")


def _print_summary(store: RunStore) -> None:
    manifest = store.read_manifest()
    stages = manifest["stages"]
    typer.echo(f"\nRun folder: {store.run_dir}")
    typer.echo(f"Report:     {store.path('report', 'report.md')}")
    for entity, counts in manifest["reconciliation"].items():
        typer.echo(f"  {entity:12s} in={counts['rows_in']:>9,} valid={counts['valid']:>9,} "
                   f"quarantined={counts['quarantined']:>7,}")
    seg = stages["segment"]
    typer.echo(f"  segments (k={seg['k']}): " + ", ".join(f"{n}={c}" for n, c in seg["sizes"].items()))
    ch = stages["churn"]
    if "skipped" in ch:
        typer.echo(f"  churn: skipped ({ch['skipped']})")
    else:
        typer.echo(f"  churn: {ch['chosen_model']} held-out ROC AUC {ch['validation_roc_auc']:.3f}, "
                   f"{ch['scored_customers']:,} customers scored")
    typer.echo(f"  rules: {stages['rules']['rules']} rules over {stages['rules']['baskets']:,} baskets")
    if (fc := stages.get("forecast")) is not None:  # runs from before the forecast stage have none
        chosen = ", ".join(f"{model} {n}" for model, n in sorted(fc["chosen_models"].items()))
        typer.echo(f"  forecast: {fc['series']} weekly series ({chosen}); {fc['fallback_to_baseline']} fell back "
                   f"to seasonal naive, {fc['not_backtested']} too short to backtest")
    value = stages.get("value", {})
    if "skipped" in value:
        typer.echo(f"  value: skipped ({value['skipped']})")
    elif value:
        typer.echo(f"  value: {value['customers_valued']:,} customers, CLV {value['total_clv']:,.0f}, value at risk "
                   f"{value['total_value_at_risk']:,.0f}, {value['action_rows']:,} actions")


def main() -> None:  # pragma: no cover - console entry for `python -m crm_analytics.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
