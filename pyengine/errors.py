"""Exceptions with messages that name the problem (and the input index or checkpoint key)."""
from __future__ import annotations


class PyEngineError(Exception):
    """Base class of every error pyengine raises on purpose."""


class InputError(PyEngineError, ValueError):
    """A caller's input is unusable; `index` names the offending item of the batch when known."""

    def __init__(self, message: str, index: int | None = None):
        self.index, self.message = index, message
        super().__init__(f"input {index}: {message}" if index is not None else message)

    def __reduce__(self):  # pickled whole (the server's worker process sends it to the front end)
        return type(self), (self.message, self.index)


class OptionError(PyEngineError, ValueError):
    """An unknown or out-of-range decoding option."""


class CheckpointError(PyEngineError):
    """A checkpoint is missing, mis-shaped or inconsistent."""


class UnknownFormatError(CheckpointError):
    """No loader recognizes a model directory."""


class BackendError(PyEngineError):
    """A requested backend is not available on this machine or device."""


class BatchMemoryError(PyEngineError, MemoryError):
    """A batch's decoding buffers exceed the engine's memory cap (or an allocation failed)."""
