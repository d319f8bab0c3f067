"""Simulated DL/T 645 meters on a shared bus, served over TCP or a pseudo-terminal, with fault injection."""
from .bus import SimBus
from .meter import Faults, SimMeter, fleet_addresses, make_meters
from .serve import PtyBus, serve_tcp

__all__ = ["SimBus", "SimMeter", "Faults", "make_meters", "fleet_addresses", "PtyBus", "serve_tcp"]
