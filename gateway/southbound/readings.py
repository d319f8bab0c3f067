"""From what the poller read to what the engine and the controller take: columns of Wh and fen, and relays."""
from __future__ import annotations

from datetime import timedelta, timezone
from decimal import Decimal

from gateway.core.commands import RelayStatus
from gateway.core.engine import NO_BALANCE, Engine, ReadingBatch
from gateway.core.readings import Reading

from .relay import status_from_word

_REGISTERS = ("forward_active_energy_total", "forward_active_energy_sharp", "forward_active_energy_peak",
              "forward_active_energy_flat", "forward_active_energy_valley")


def to_batch(readings: list[Reading], engine: Engine, utc_offset_s: int = 8 * 3600
             ) -> tuple[ReadingBatch, list[tuple[str, RelayStatus, float]]]:
    """Energy registers (kWh, 2 decimals) become Wh exactly; the purse (yuan) fen; status word 3 the relay,
    with when it was read. A reading without the energy block still reports its relay. Times without a zone
    are the utility's."""
    zone = timezone(timedelta(seconds=utc_offset_s))
    rows, relays = [], []
    for r in readings:
        v = r.values
        taken = r.taken_at if r.taken_at.tzinfo else r.taken_at.replace(tzinfo=zone)
        word = v.get("status_word_3")
        if word:
            relays.append((r.meter, status_from_word(word), taken.timestamp()))
        block = v.get("forward_active_energy_block")
        if not block:
            continue
        regs = [int(Decimal(block[name]) * 1000) for name in _REGISTERS]
        purse = v.get("remaining_amount")
        balance = NO_BALANCE if purse is None else int(Decimal(purse) * 100)
        rows.append((engine.meter_no.get(r.meter, -1), int(taken.timestamp()), *regs, balance))
    return ReadingBatch.from_rows(rows), relays
