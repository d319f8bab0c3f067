"""Relay drivers: send a trip or a close to a meter, and read its relay back. One per bus.

The executor speaks only this interface; the DL/T 645 driver maps it to control command 1C and run status
word 3. (Modbus and MQTT concentrators get their own drivers with the same rules.)
"""
from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta, timezone
from typing import Protocol

from gateway.core.commands import ReconnectMode, RelayAction, RelayStatus
from protocols.dlt645.client import Dlt645BadReply, Dlt645Client, Dlt645LinkError, Dlt645Refused, Dlt645Timeout
from protocols.dlt645.codes import RelayAction as Dlt645Action
from protocols.dlt645.formats import FormatError


class RelayDriverError(Exception):
    pass


class RelayNoAnswer(RelayDriverError):
    """Nothing came back: whether the frame acted is unknown."""


class RelayRefused(RelayDriverError):
    def __init__(self, message: str, errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.errors = errors


class RelayLinkDown(RelayDriverError):
    def __init__(self, message: str, written: bool) -> None:
        super().__init__(message)
        self.written = written


class RelayDriver(Protocol):
    name: str

    def reserved(self) -> AbstractAsyncContextManager: ...

    async def open(self) -> None:
        """Make the line ready (a TCP link connected), or :class:`RelayLinkDown` (nothing written). The
        executor does this before its last lease check, so that only the write follows that check."""

    async def send(self, meter_id: str, action: RelayAction, mode: ReconnectMode, valid_until: float) -> None: ...

    async def read(self, meter_id: str) -> RelayStatus: ...


_ACTIONS = {(RelayAction.TRIP, ReconnectMode.DIRECT): Dlt645Action.TRIP,
            (RelayAction.TRIP, ReconnectMode.CLOSE_ALLOWED): Dlt645Action.TRIP,
            (RelayAction.CLOSE, ReconnectMode.DIRECT): Dlt645Action.DIRECT_CLOSE,
            (RelayAction.CLOSE, ReconnectMode.CLOSE_ALLOWED): Dlt645Action.CLOSE_ALLOWED}


class Dlt645RelayDriver:
    """Relay control over DL/T 645-2007: command 1C with a validity deadline, status word 3 read back."""

    def __init__(self, client: Dlt645Client, utc_offset_s: int = 8 * 3600) -> None:
        self.client = client
        self.name = client.link.name
        self.zone = timezone(timedelta(seconds=utc_offset_s))

    def reserved(self):
        return self.client.link.reserved()

    async def open(self) -> None:
        try:
            await self.client.link.open()
        except Dlt645LinkError as exc:
            raise RelayLinkDown(str(exc), written=False) from None

    async def send(self, meter_id: str, action: RelayAction, mode: ReconnectMode, valid_until: float) -> None:
        # the meter checks the deadline against its own clock, which keeps the utility's local time
        deadline = datetime.fromtimestamp(int(valid_until), self.zone).replace(tzinfo=None)
        try:
            await self.client.relay(meter_id, _ACTIONS[(action, mode)], valid_until=deadline, retries=0)
        except Dlt645Timeout as exc:
            raise RelayNoAnswer(str(exc)) from None
        except Dlt645Refused as exc:
            raise RelayRefused(str(exc), tuple(exc.errors)) from None
        except Dlt645LinkError as exc:
            raise RelayLinkDown(str(exc), exc.written) from None
        except Dlt645BadReply as exc:  # something answered, but not an acknowledgement: the outcome is unknown
            raise RelayNoAnswer(str(exc)) from None

    async def read(self, meter_id: str) -> RelayStatus:
        try:
            word = await self.client.relay_state(meter_id)
        except Dlt645Refused as exc:
            raise RelayRefused(str(exc), tuple(exc.errors)) from None
        except Dlt645Timeout as exc:
            raise RelayNoAnswer(str(exc)) from None
        except Dlt645LinkError as exc:
            raise RelayLinkDown(str(exc), exc.written) from None
        except (FormatError, Dlt645BadReply) as exc:
            raise RelayDriverError(f"meter {meter_id}: unreadable status word 3: {exc}") from None
        return status_from_word(word)


def status_from_word(word: dict) -> RelayStatus:
    """Run status word 3 (decoded) -> relay status: bit 4 the contact, bit 6 the command, bit 12 keep-power."""
    return RelayStatus(word["relay"] == "open", word["relay_command"] == "open", bool(word["keep_power"]))
