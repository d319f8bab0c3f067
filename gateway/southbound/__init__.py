"""Meter channels and the poll scheduler: the gateway's side of the meter buses."""
