"""Exceptions with messages that name the problem and the fix."""

from __future__ import annotations


class Vox2VecError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(Vox2VecError, ValueError):
    """The input volume, array or file cannot be used as given."""


class UnknownModelError(Vox2VecError, KeyError):
    """A model name that is neither registered, nor a local path, nor a Hub repo id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointMismatchError(Vox2VecError, ValueError):
    """A checkpoint whose keys or tensor shapes do not match the architecture."""


class ChecksumError(Vox2VecError, OSError):
    """A downloaded file whose size or sha256 is not the expected one."""
