"""Stage options from the command line: ``--options file.yaml`` and ``--set section.field=value``.

Both become one nested dict, validated by :class:`PipelineOptions` (the model the Prefect UI renders as a
form), so the command line accepts exactly what the form accepts. The file comes first, then the command's
own flags (``--mapping``, ...), then each ``--set`` in order. A value is read as a YAML scalar or flow
collection (``0.001``, ``true``, ``[a, b]``, ``2025-01-31``) and typed by the model; a wrong one is one line
naming the option and what it allows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from crm_analytics.errors import PermanentError
from crm_analytics.parameters import PipelineOptions


class OptionError(PermanentError, ValueError):
    """A stage option given on the command line or in an options file is wrong."""


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"rules.min_support=0.001"`` -> ``(["rules", "min_support"], 0.001)``."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise OptionError(f"--set {text!r}: expected section.field=value, e.g. rules.min_support=0.001")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise OptionError(f"--set {key}: {raw!r} is not a value ({first})") from None
    return path, value


def read_options_file(path: Path) -> dict[str, Any]:
    """The nested options of a YAML file (the same shape as the UI form: ``rules: {min_support: 0.001}``)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"--options {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise OptionError(f"--options {path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise OptionError(f"--options {path}: expected a mapping of sections (e.g. 'rules: {{min_support: 0.01}}'), "
                          f"got a {type(loaded).__name__}")
    return loaded


def merged_options(options_file: Path | None = None, assignments: list[str] = (),
                   given: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
                   where: str = "options") -> PipelineOptions:
    """The run's options: the command's ``defaults``, the file's, then ``given`` (the command's own flags,
    ``None`` = not given), then each ``--set``; validated by ``PipelineOptions``."""
    # Copied: --set edits nested sections in place, and ``defaults`` is often a module constant.
    merged = copy.deepcopy(_deep_merge(defaults or {}, read_options_file(options_file) if options_file else {}))
    for key, value in (given or {}).items():
        if value is not None:
            merged[key] = value
    for text in assignments:
        path, value = parse_assignment(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    try:
        return PipelineOptions.model_validate(merged)
    except ValidationError as exc:
        raise OptionError(validation_error_line(exc, PipelineOptions, where)) from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (_deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def validation_error_line(exc: ValidationError, model: type[BaseModel], where: str = "options") -> str:
    """One line for every problem pydantic found: the dotted option, what is wrong, and what it allows."""
    problems = []
    for error in exc.errors(include_url=False):
        dotted = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            known = _known_fields(model, error["loc"][:-1])
            message = f"unknown option (known here: {', '.join(known)})" if known else "unknown option"
        elif (allowed := _allowed_range(model, error["loc"])) and allowed not in message:
            message = f"{message} (allowed: {allowed})"
        if error["type"] != "extra_forbidden" and "input" in error and not isinstance(error["input"], dict):
            message = f"{message}; got {error['input']!r}"
        problems.append(f"{dotted}: {message}" if dotted else message)
    return f"{where}: " + "; ".join(problems)


def _field(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo at ``loc`` (a path of field names), or ``None``."""
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    target = _field(model, loc).annotation if loc and _field(model, loc) else model
    return sorted(target.model_fields) if isinstance(target, type) and issubclass(target, BaseModel) else []


def _allowed_range(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """A numeric field's bounds as the model declares them, e.g. ``> 0 and <= 1``."""
    info = _field(model, loc)
    if info is None:
        return ""
    symbols = {annotated_types.Gt: ("gt", ">"), annotated_types.Ge: ("ge", ">="),
               annotated_types.Lt: ("lt", "<"), annotated_types.Le: ("le", "<=")}
    bounds = [f"{symbol} {getattr(item, attr)}" for item in info.metadata
              for kind, (attr, symbol) in symbols.items() if isinstance(item, kind)]
    return " and ".join(bounds)
