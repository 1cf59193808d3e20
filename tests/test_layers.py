"""The bottom layer stays at the bottom: no module of ``crm_analytics`` imports ``tasks`` or ``flows``, except
the CLI, which is the top (it starts the flows; its imports of them are inside its commands)."""

import ast
from pathlib import Path

import crm_analytics

TOP = {"cli.py"}


def test_crm_analytics_imports_neither_tasks_nor_flows():
    upward = []
    for path in sorted(Path(crm_analytics.__file__).parent.glob("*.py")):
        if path.name in TOP:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            upward += [f"{path.name}: {m}" for m in modules if m.split(".")[0] in ("tasks", "flows")]
    assert upward == []
