"""Report: assemble the stages' own sections and figures into one Markdown report, also shown in the UI.

Each stage writes what a person should read about it (``StageResult.report_section``) and its figures
(``report/figures/<stage>_<name>.png``); this stage only puts them in order, so a stage that learns to say
more does not need the report to change.
"""

from __future__ import annotations

import base64
from datetime import date
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from crm_analytics.artifacts import RunStore, StageResult
from crm_analytics.parameters import RunSpec
from tasks.value.report import UI_ACTION_COLUMNS

# Tables a person should see in the Prefect UI next to the report: (stage, artifact, key, columns, rows).
UI_TABLES = (
    ("segment", "profiles", "segment-profiles", None, 50),
    ("churn", "model_comparison", "churn-model-comparison", None, 20),
    ("rules", "rules", "top-association-rules", ["antecedents", "consequents", "support", "confidence", "lift"], 20),
    ("forecast", "backtest", "forecast-backtest", ["series_id", "model", "mase", "mase_vs_baseline", "smape",
                                                    "coverage_80", "coverage_95", "chosen", "status"], 150),
    ("value", "value_by_segment", "value-at-risk-by-segment", None, 50),
    ("value", "actions", "value-action-list", UI_ACTION_COLUMNS, 20),  # pseudonymous ids only
)


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


def inline_figures(markdown: str, report_dir: Path) -> str:
    """The report with each figure embedded as a data URI: the UI cannot load files from the run folder."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("![") and line.endswith(")") and "](" in line:
            title, link = line[2:-1].split("](", 1)
            data = base64.b64encode((report_dir / link).read_bytes()).decode()
            line = f"![{title}](data:image/png;base64,{data})"
        lines.append(line)
    return "\n".join(lines)


def _json_cells(frame: pd.DataFrame) -> list[dict]:
    def cell(value: object) -> object:
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, float):
            return round(value, 4)
        return value if isinstance(value, int | str | bool) or value is None else str(value)

    return [{k: cell(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def publish_ui_artifacts(store: RunStore, results: list[StageResult], markdown: str) -> None:
    """What a person sees in the Prefect UI: the report, a few tables, and a link to the run folder."""
    if flow_run.get_id() is None:  # a stage called directly (a notebook, a benchmark): no run to attach to
        return
    as_of = store.as_of.isoformat()
    create_markdown_artifact(markdown=inline_figures(markdown, store.run_dir / "report"),
                             key="customer-analytics-report", description=f"Customer analytics as of {as_of}")
    by_stage = {r.stage: r for r in results}
    if "validate" in by_stage:
        quality = [{"entity": e, **{k: m[k] for k in ("rows_in", "valid", "quarantined", "quarantine_rate")}}
                   for e, m in by_stage["validate"].metrics["entities"].items()]
        create_table_artifact(table=quality, key="data-quality", description=f"Rows in, valid, quarantined ({as_of})")
    for stage, name, key, columns, limit in UI_TABLES:
        if stage in by_stage and name in by_stage[stage].artifacts:
            frame = store.read_frame(by_stage[stage].ref(name), columns=columns).head(limit)
            create_table_artifact(table=_json_cells(frame), key=key, description=f"{stage}: {name} ({as_of})")
    create_link_artifact(link=store.run_dir.resolve().as_uri(), link_text=f"Run folder as of {as_of}",
                         key="run-folder", description="Every artifact of this run; _manifest.json is written last")


@task(name="report")
def report(run: RunSpec, results: list[StageResult]) -> StageResult:
    store = run.store
    markdown = assemble_report(run.as_of, results, store.run_dir / "report")
    ref = store.write_text("report", "report.md", markdown)
    publish_ui_artifacts(store, results, markdown)
    return StageResult(stage="report", artifacts={"report": ref},
                       metrics={"sections": sum(bool(r.report_section) for r in results)})
