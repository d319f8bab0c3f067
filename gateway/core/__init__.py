"""Pure domain code: no I/O, clock injected."""
