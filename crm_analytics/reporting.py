"""Helpers for what a person reads: Markdown tables and figures. Each stage writes its own report section
and figures with these; the report stage only assembles them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from crm_analytics.artifacts import ArtifactRef, RunStore  # noqa: E402


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table; list cells are joined with commas."""

    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            return floatfmt.format(value)
        if isinstance(value, list | tuple | np.ndarray):
            return ", ".join(map(str, value))
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


# pyplot and matplotlib's text parser keep global state: two runs drawing at once in one process (a backfill
# with concurrency > 1) corrupt each other's figures. Drawing and saving happen under this lock.
_PLOT_LOCK = threading.RLock()


def save_figure(store: RunStore, stage: str, name: str, figure: plt.Figure) -> ArtifactRef:
    """Write a figure to ``report/figures/<stage>_<name>.png`` (atomically) and close it."""
    with _PLOT_LOCK:
        ref = store.write_with("report", f"figures/{stage}_{name}.png", "png",
                               lambda path: figure.savefig(path, format="png", dpi=110))
        plt.close(figure)
    return ref


def save_figures(store: RunStore, stage: str, draw: Callable[[], dict[str, plt.Figure]]) -> dict[str, ArtifactRef]:
    """Draw a stage's figures and save them, holding the plotting lock throughout; keys are ``figure_<name>``."""
    with _PLOT_LOCK:
        return {f"figure_{name}": save_figure(store, stage, name, figure) for name, figure in draw().items()}
