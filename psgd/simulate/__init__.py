"""``psgd simulate``: thousands of workers on virtual time, on the server's own rules."""

from .engine import SimSpec, Simulator, simulate, staleness_tv
from .events import Dist, EventQueue

__all__ = ["SimSpec", "Simulator", "simulate", "staleness_tv", "Dist", "EventQueue"]
