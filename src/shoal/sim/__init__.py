"""Simulation: the in-process transport, its executors, and simulated client behaviour."""

from .dropout import simulated_dropout
from .executor import (
    AutoExecutor,
    Executor,
    SequentialExecutor,
    VectorizedExecutor,
    make_executor,
)
from .inprocess import InProcessTransport
from .processes import ProcessesExecutor, serve

__all__ = ["AutoExecutor", "Executor", "InProcessTransport", "ProcessesExecutor",
           "SequentialExecutor", "VectorizedExecutor", "make_executor", "serve",
           "simulated_dropout"]
