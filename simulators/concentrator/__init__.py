"""Simulated MQTT concentrators: many simulated DL/T 645 meters behind one MQTT connection, in transparent
(frame) or JSON mode, with the serial simulator's fault injection."""
from .sim import SimConcentrator, SimConcentratorStats

__all__ = ["SimConcentrator", "SimConcentratorStats"]
