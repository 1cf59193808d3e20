"""Report: assemble the stages' own sections and figures into one Markdown report, also shown in the UI.

Each stage writes what a person should read about it (``StageResult.report_section``) and its figures
(``report/figures/<stage>_<name>.png``); this stage only puts them in order, so a stage that learns to say
more does not need the report to change.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec


def assemble_report(as_of: date, results: list[StageResult], report_dir: Path) -> str:
    """The run report as Markdown; figure links are relative to ``report_dir``."""
    parts = [f"# Customer analytics — as of {as_of.isoformat()}"]
    for result in results:
        if result.report_section:
            parts.append(result.report_section)
        for figure in result.figures:
            title = figure.name.replace("_", " ")
            parts.append(f"![{title}]({Path(figure.path).relative_to(report_dir).as_posix()})")
    return "\n\n".join(parts) + "\n"


@task(name="report")
def report(run: RunSpec, results: list[StageResult]) -> StageResult:
    store = run.store
    markdown = assemble_report(run.as_of, results, store.run_dir / "report")
    ref = store.write_text("report", "report.md", markdown)
    # The UI cannot show local images: publish the text and tables; the figures live beside report.md.
    ui_text = "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
    create_markdown_artifact(
        markdown=ui_text + f"\n\nFull report with figures: `{ref.path}`",
        key="customer-analytics-report",
        description=f"Customer analytics report as of {run.as_of.isoformat()}",
    )
    return StageResult(stage="report", artifacts={"report": ref},
                       metrics={"sections": sum(bool(r.report_section) for r in results)})
