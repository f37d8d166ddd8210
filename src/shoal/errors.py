"""The exception tree of shoal.

Every error shoal raises on purpose derives from :class:`ShoalError`, and its message says what
was wrong, what was expected, what was got, and how to fix it::

    ShoalError
    ├── ConfigError        a config field is unknown, of the wrong type, or out of range
    │   └── AggregationError   a pipeline cannot be built or cannot reduce what it was given
    ├── DataError          a data file is missing or malformed; a partition is impossible
    ├── ModelError         a model cannot be used the way it was asked (cut, vectorised, DP)
    ├── UpdateError        a client update has the wrong names, shapes, dtypes or non-finite values
    ├── RoundError         a round cannot complete (too few valid replies)
    ├── ClientError        an exception inside a client, naming the client, round and step
    ├── WorkerError        a worker process failed to start or died, naming it and the fix
    ├── CheckpointError    a run directory cannot be used or resumed
    └── TransportError     a message could not be delivered or decoded
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "DataError",
    "ModelError",
    "RoundError",
    "ShoalError",
    "TransportError",
    "UpdateError",
    "WorkerError",
]


class ShoalError(Exception):
    """Base class of every error shoal raises on purpose."""


class ConfigError(ShoalError, ValueError):
    """A configuration field is unknown, of the wrong type, or out of range."""


class DataError(ShoalError):
    """A data file is missing or malformed, or the data cannot be partitioned as asked."""


class ModelError(ShoalError):
    """A model cannot be used the way it was asked (cut, vectorised, trained with DP)."""


class UpdateError(ShoalError, ValueError):
    """A client update does not match the model: names, shapes, dtypes, or non-finite values."""


class AggregationError(ConfigError):
    """An aggregation pipeline cannot be built (a setting that is not allowed, hence a
    :class:`ConfigError`), or cannot reduce what it was given."""


class RoundError(ShoalError):
    """A round cannot complete, for example because too few clients replied."""


class ClientError(ShoalError):
    """An exception raised inside a client's computation.

    The message names the client, the round and the local step; the original exception is
    chained as ``__cause__`` so its traceback is kept.
    """

    def __init__(self, message: str, *, client: str, round: int, step: int | None = None):
        super().__init__(message)
        self.client = client
        self.round = round
        self.step = step


class WorkerError(ShoalError):
    """A worker process (processes executor, data-parallel training) failed to start or died;
    the message names the worker, its exit code and the fix."""


class CheckpointError(ShoalError):
    """A run directory cannot be used or resumed: it holds another run, cannot be created, is
    missing, or its checkpoints belong to another config or cannot be read."""


class TransportError(ShoalError):
    """A message could not be delivered, encoded or decoded."""
