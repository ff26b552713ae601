"""Exceptions with messages that name the problem and the fix.

Every error this package raises on purpose derives from :class:`Vox2VecError`; the command line prints such errors
as one line (``vox2vec: error: …``) and exits with status 2. Each subclass also keeps the built-in base a caller
would have caught before (``ValueError``, ``KeyError``, ``OSError``, ``TypeError``).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError", "CheckpointMismatchError", "ChecksumError", "ConfigError", "DeviceError", "InputError",
    "MissingExtraError", "NotHounsfieldWarning", "OutputError", "UnknownModelError", "UnsupportedTypeError",
    "UsageError", "Vox2VecError",
]


class Vox2VecError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(Vox2VecError, ValueError):
    """The input volume, array or file cannot be used as given."""


class ArgumentError(Vox2VecError, ValueError):
    """An argument (a number, an option, a name) outside what the function accepts."""


class UnsupportedTypeError(Vox2VecError, TypeError):
    """An object of a type this function cannot work with."""


class ConfigError(Vox2VecError, ValueError):
    """A model or pre-training configuration value that cannot work."""


class DeviceError(Vox2VecError, ValueError):
    """A requested device (``cuda:7``, ``gpu``) that this machine does not have."""


class OutputError(Vox2VecError, ValueError):
    """An output path we refuse to write: it is an input, not writable, the wrong kind of path, or someone else's
    file that would be overwritten."""


class UnknownModelError(Vox2VecError, KeyError):
    """A model name that is neither registered, nor a local path, nor a Hub repo id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointMismatchError(Vox2VecError, ValueError):
    """A checkpoint whose keys or tensor shapes do not match the architecture."""


class ChecksumError(Vox2VecError, OSError):
    """A downloaded file whose size or sha256 is not the expected one."""


class UsageError(Vox2VecError, RuntimeError):
    """An object used in a way it does not support (a one-shot cohort run iterated a second time)."""


class MissingExtraError(Vox2VecError, ImportError):
    """An optional dependency (a ``pip install vox2vec[extra]``) that this function needs is not installed."""


class NotHounsfieldWarning(UserWarning):
    """The intensities do not look like CT in Hounsfield units (already normalised, MR, shifted, or no body).

    Callers that must not embed such volumes (cohort runs) filter on this category, never on the message text.
    """
