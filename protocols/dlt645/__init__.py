"""DL/T 645-2007 and -1997: frames, streaming deframer, data identifiers, messages.

Everything here is sans-I/O; :mod:`protocols.dlt645.client` is the thin asyncio adapter.
"""
from .codes import Edition, RelayAction, error_names
from .deframer import Deframer, FrameReceived, FrameRejected, Noise
from .di import DataItem, Value, decode_value, encode_value, lookup, resolve
from .formats import FormatError
from .frame import (
    BROADCAST_ADDRESS,
    WILDCARD_ADDRESS,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    normalise_address,
)
from .messages import (
    AbnormalReply,
    Ack,
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    FreezeRequest,
    MessageError,
    ReadAddressReply,
    ReadAddressRequest,
    ReadFollowupRequest,
    ReadReply,
    ReadRequest,
    RelayControlRequest,
    UnknownMessage,
    WriteRequest,
    describe,
    parse,
)

__all__ = [name for name in dir() if not name.startswith("_")]
