"""Simulated Modbus meters (one per device id) on pymodbus's server, over TCP or RTU on a pty pair."""
from .meter import Faults, ModbusSimMeter, PtyPair, SimServer, serve_rtu, serve_tcp

__all__ = ["Faults", "ModbusSimMeter", "PtyPair", "SimServer", "serve_rtu", "serve_tcp"]
