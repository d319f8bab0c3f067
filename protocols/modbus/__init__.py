"""Modbus meters: register-map profiles (data files) and pure encode/decode over registers."""
from .profile import (Point, Profile, ProfileError, ReadBlock, RelayWrite, ValueDecodeError, action_of_write,
                      decode, encode, load_profile, parse_profile, read_plan, relay_write, shipped, to_items)

__all__ = ["Point", "Profile", "ProfileError", "ReadBlock", "RelayWrite", "ValueDecodeError", "action_of_write",
           "decode", "encode", "load_profile", "parse_profile", "read_plan", "relay_write", "shipped", "to_items"]
