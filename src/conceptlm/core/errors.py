"""Errors that carry a location, so a user sees ``file:line: field: what is wrong`` instead of a traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConceptLMError", "ConfigError", "DataError", "NonFiniteLossError", "CheckpointError", "RunLockedError"]


class ConceptLMError(Exception):
    """Base class for errors the CLI reports as one clear line (no traceback)."""


def _locate(path: str | Path | None, line: int | None, field: str | None, message: str) -> str:
    where = ""
    if path is not None:
        where = str(path)
        if line is not None:
            where += f":{line}"
    parts = [p for p in (where, f"field '{field}'" if field else "", message) if p]
    return ": ".join(parts)


class ConfigError(ConceptLMError, ValueError):
    """A config file or override is invalid. ``str(err)`` names the file, line and field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        super().__init__(_locate(path, line, field, message))


class DataError(ConceptLMError, ValueError):
    """A data record is malformed. ``str(err)`` names the file, line (1-based) and field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        super().__init__(_locate(path, line, field, message))


class NonFiniteLossError(ConceptLMError, FloatingPointError):
    """Training produced a NaN/inf loss; the run stops and the last good checkpoint is left intact."""


class CheckpointError(ConceptLMError, RuntimeError):
    """A checkpoint cannot be loaded into the unit (missing / unexpected / wrong-shape tensor, unreadable file), no
    checkpoint of a run is intact, or a checkpoint cannot be written (a full disk)."""


class RunLockedError(ConceptLMError, RuntimeError):
    """Another live process is writing the same run folder."""
