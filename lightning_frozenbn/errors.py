"""The package's errors: one base for "your input is wrong" (the CLI's exit 2) and the runtime stops (exit 1)."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "FrozenStateViolation",
    "GuardConfigError",
    "InputError",
    "WeightsDownloadError",
    "WeightsMismatchError",
]


class InputError(Exception):
    """Something the user gave is wrong: a value, a file, the data. The message names it and the fix.

    Catch this one to handle every such mistake; the command line reports it as one ``error:`` line and
    exits with 2, having trained nothing and touched no earlier run's files.
    """


class DataError(InputError, ValueError):
    """The data folder is missing, malformed, or holds a file that cannot be decoded."""


class WeightsMismatchError(InputError, ValueError):
    """A weights file does not fit the requested architecture."""


class WeightsDownloadError(InputError, FileNotFoundError):
    """torchvision's weights could not be downloaded and are not in its cache."""


class CheckpointError(InputError, ValueError):
    """A checkpoint cannot be read: missing, truncated, corrupt or unsafe."""


class GuardConfigError(InputError, ValueError):
    """The guard's ``modules`` or ``on_violation`` argument cannot be used with this model."""


class FrozenStateViolation(RuntimeError):
    """A frozen parameter or buffer changed, or ranks disagree on the frozen state (a runtime stop, exit 1)."""
