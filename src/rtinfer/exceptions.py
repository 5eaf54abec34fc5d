"""Every error rtinfer raises on purpose, in one tree.

::

    RtinferError
    ├── ConfigError            a pipeline file or argument is wrong; names the file and key
    ├── ModelError
    │   ├── ModelLoadError     a model file is missing, unreadable or refused (pickle)
    │   └── ModelInputError    inputs do not match the model's names, shapes or dtypes
    ├── DeadlineExceeded       an item's deadline passed before the model ran it
    ├── Overloaded             a queue is full; carries ``retry_after`` seconds
    ├── MissingDependency      an optional extra is not installed; says what to pip install
    └── Closed                 the component was closed while the call waited

Errors carry what a caller needs to react (``retry_after``, ``key``) as
attributes, and their messages name the value received, the rule broken and
the fix.
"""

from __future__ import annotations

__all__ = [
    "Closed",
    "ConfigError",
    "DeadlineExceeded",
    "MissingDependency",
    "ModelError",
    "ModelInputError",
    "ModelLoadError",
    "Overloaded",
    "RtinferError",
]


class RtinferError(Exception):
    """Base of every error rtinfer raises on purpose."""


class ConfigError(RtinferError):
    """A configuration file or value is wrong.

    ``file`` and ``key`` (a dotted path such as ``model.batching.max_size``)
    say where, when known.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ""
        if file is not None:
            where = f"{file}: "
        if key is not None:
            where += f"at key '{key}': "
        super().__init__(where + message)
        self.file = file
        self.key = key


class ModelError(RtinferError):
    """A model could not be loaded or called."""


class ModelLoadError(ModelError):
    """A model file is missing, unreadable, of an unknown kind, or refused."""


class ModelInputError(ModelError, ValueError):
    """Inputs do not match the model: unknown or missing names, wrong shape or dtype."""


class DeadlineExceeded(RtinferError):
    """The deadline of an item passed before it could be run; it was never batched."""


class Overloaded(RtinferError):
    """A bounded queue is full. Try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MissingDependency(RtinferError, ImportError):
    """An optional dependency is not installed; the message names the install that fixes it."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs an optional dependency: pip install 'rtinfer[{extra}]'")
        self.extra = extra


class Closed(RtinferError):
    """The component was closed while the call was waiting on it."""
