"""The permanent error classes: a failure that a retry cannot fix, reported as one line without any row content.

They live here, at the bottom of the package, so that the mapping and privacy modules (which must not import
``tasks``) raise the same classes the stages do; ``tasks.common`` re-exports them. The CLI and a deployment's
flow run end a run that raises one of them with its message as the single ``error:`` line.
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that a retry cannot fix (bad mapping, missing column, data-quality gate)."""


class SourceSchemaError(PermanentError):
    """An input file lacks a column the mapping needs, or cannot be parsed as configured."""


class DataQualityError(PermanentError):
    """Too many rows of an entity failed validation: the run stops before any model is retrained."""


class MappingError(PermanentError, ValueError):
    """The mapping itself is wrong (a permanent error: retrying cannot help)."""


class InputError(PermanentError):
    """The landing folder does not hold what the mapping describes (a file missing, or outside the folder)."""


class MissingInputError(InputError, FileNotFoundError):
    """No landing file matches an entity's ``files`` pattern (for daily files: none dated by the as-of date)."""


class PersonalDataError(MappingError):
    """A column that looks like personal data (e-mail addresses, phone numbers) is not declared in ``pii``."""
