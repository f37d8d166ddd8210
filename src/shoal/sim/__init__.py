"""Simulation: the in-process transport and simulated client behaviour (dropout)."""

from .dropout import simulated_dropout
from .inprocess import InProcessTransport

__all__ = ["InProcessTransport", "simulated_dropout"]
