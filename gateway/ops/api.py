"""The operator HTTP API: health, meters, accounts, commands, field orders, manual relay work with the two-person
rule, adjustments, area flags and the audit log (docs/api.md).

It runs on the gateway's event loop (:class:`ApiServer` serves uvicorn there) and reaches the store and the
controller only through the gateway's single writer: every handler's store work is one
``await gateway.writer.call(fn, ...)``, and every change is committed with its audit record in one
transaction. Tokens (:mod:`gateway.ops.auth`) name the caller and the role; :data:`ACTIONS` says which role
each action needs. Bad input gets a 4xx whose body says what was wrong and where; no request data is echoed
back, so nothing secret sent by mistake comes back in a response or a log line.
"""

import asyncio
import contextlib
import dataclasses
import logging
import socket
import uuid
from datetime import timedelta, timezone
from enum import Enum
from typing import Annotated, Literal

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.cluster import NotHeld
from gateway.core.approvals import DEFAULT_TTL_S, ApprovalError, KeyInUse, NotPending, NotPermitted
from gateway.core.commands import ReconnectMode, RelayAction
from gateway.core.control import AuthorityError
from gateway.core.model import Adjustment, MoneyError
from gateway.core.policy import AreaFlag
from gateway.core.thresholds import BAND_NAMES
from protocols.mqtt.billing import ID_CHAR, TEXT_CHAR

from .approvals import Approvals
from .audit import ChainWalk
from .auth import Identity, RedactTokens, Tokens, redact

log = logging.getLogger(__name__)
LOGGERS = ("uvicorn.access", "uvicorn.error", __name__)  # what the API logs to: tokens masked on each

PREFIX = "/api/v1"
#: meters read per writer call while looking for a balance band (a few milliseconds of the writer each)
BAND_SCAN = 2000
#: the least role each action needs (viewer < operator < supervisor < admin); docs/api.md has the same table
ACTIONS = {
    "view": "viewer",  # meters, accounts, statements, commands, orders, requests, area flags
    "read_meter": "operator",  # an on-demand read on the meter's line
    "close": "operator",  # a manual reconnect: no second person needed
    "cancel": "operator",  # stop a relay command not yet on the wire
    "request_disconnect": "operator",  # one meter, or a batch plan: a request for a supervisor
    "decide": "supervisor",  # approve or reject someone else's disconnect request
    "adjustment": "supervisor",  # credit a customer
    "refund": "admin",  # take money out
    "area_flag": "supervisor",  # set or clear an area flag (no automatic trips there)
    "audit": "supervisor",  # read and verify the audit log
}
MAX_BODY = 2 * 1024 * 1024  # a plan of 10,000 meter ids fits
READINGS_WINDOW_S = 7 * 86400  # "last readings": from the last week (readings are clustered by time)

# the MQTT contract's characters: a NUL or other control character is a 422 naming the field, not a 500 from
# PostgreSQL; ids are path segments too, so no "/" in them
Reason = Annotated[str, Field(min_length=1, max_length=500, pattern=f"^{TEXT_CHAR}*{ID_CHAR}{TEXT_CHAR}*$",
                              description="why: required, not blank, no control characters; recorded in the "
                                          "audit log")]
_ID_PATTERN = r"^[^\s/\x00-\x1f\x7f]+$"
Id = Annotated[str, Field(min_length=1, max_length=120, pattern=_ID_PATTERN,
                          description="1 to 120 characters, no spaces, slashes or control characters")]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReasonBody(_Body):
    reason: Reason


class CloseBody(_Body):
    reason: Reason
    mode: ReconnectMode | None = Field(None, description="the meter's own reconnect mode when left out")
    key: Id | None = Field(None, description="idempotency key: the same key again is the same command")


class DisconnectBody(_Body):
    reason: Reason
    key: Id | None = Field(None, description="idempotency key: the same request again is the one already made")


class PlanBody(DisconnectBody):
    meter_ids: list[Id] = Field(min_length=1, max_length=10_000)


class AdjustmentBody(_Body):
    adjustment_id: Id = Field(description="idempotency key: the same id again is acknowledged, not counted twice")
    amount_fen: int = Field(strict=True, ge=-10**10, le=10**10,
                            description="fen; positive credits the customer, negative (a refund) takes money out")
    reason: Reason


class AreaFlagBody(_Body):
    area: Annotated[str, Field(min_length=1, max_length=64, pattern=f"^{TEXT_CHAR}*{ID_CHAR}{TEXT_CHAR}*$")]
    flag: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
    active: bool
    until: int | None = Field(None, strict=True, ge=0, le=2**40, description="epoch seconds; none: until cleared")
    reason: Reason


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _error(status: int, message: str, errors: list[dict] | None = None) -> JSONResponse:
    body: dict = {"error": redact(message)}
    if errors:
        body["errors"] = [{**e, "message": redact(e["message"])} for e in errors]
    return JSONResponse(body, status_code=status)


def _plain(obj):
    """Entities as JSON-ready data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return obj


def _page(items: list, limit: int, offset: int) -> dict:
    return {"items": items, "limit": limit, "offset": offset,
            "next_offset": offset + limit if len(items) == limit else None}


def create_app(gateway, tokens: Tokens, *, clock=None, bridge=None, request_ttl_s: float = DEFAULT_TTL_S):
    """The ASGI app over an opened :class:`gateway.app.Gateway`. ``bridge``: the billing bridge, if any, for
    readiness; ``request_ttl_s``: how long a disconnect request waits for its second person."""
    clock = clock or gateway.clock
    app = FastAPI(title="feikong operator API", version="1", description=__doc__.split("\n\n")[0],
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="an operator token (feikong token add)")
    state: dict = {}

    def approvals() -> Approvals:
        if "approvals" not in state:
            state["approvals"] = Approvals(gateway.control, request_ttl_s)
        return state["approvals"]

    async def on_writer(fn, *args, **kw):
        return await gateway.writer.call(fn, *args, **kw)

    def role(action: str):
        need = ACTIONS[action]

        async def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Identity:
            who = tokens.identify(creds.credentials) if creds is not None else None
            if who is None:
                raise ApiError(401, "a valid operator token is required (Authorization: Bearer TOKEN)")
            if not who.at_least(need):
                raise ApiError(403, f"{action} needs the role {need} or above; {who.name} is {who.role}")
            return who

        return Depends(check)

    # -- errors: one shape, the field named, nothing of the input echoed ---------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        response = _error(exc.status, exc.message, [{"field": exc.field, "message": exc.message}] if exc.field else None)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(NotHeld)
    async def _not_held(request: Request, exc: NotHeld):
        # several instances: the meter's channel is another's (docs/scaling.md)
        return _error(409, str(exc), [{"field": "channel", "message": f"held by {exc.holder or 'nobody'}"}])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "invalid")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        return _error(422, f"{first['field']}: {first['message']}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("API %s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
        return _error(500, "internal error (logged by the gateway)")

    @app.middleware("http")
    async def _bounded(request: Request, call_next):
        """A body larger than any request here needs is refused before it is read."""
        if "transfer-encoding" in request.headers and "content-length" not in request.headers:
            return _error(411, "a request body needs a Content-Length (chunked bodies are refused)")
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY:
            return _error(413 if size.isdigit() else 400,
                          f"request body of {size} bytes: at most {MAX_BODY} bytes, with a Content-Length")
        return await call_next(request)

    # -- health ----------------------------------------------------------------------------------------
    @app.get("/health", tags=["health"], summary="live: the process answers")
    @app.get(f"{PREFIX}/health", tags=["health"], summary="live (the same under the API's prefix)")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], summary="ready: the store answers, the bridge is connected, channels bound")
    @app.get(f"{PREFIX}/ready", tags=["health"], summary="ready (the same under the API's prefix)")
    async def ready():
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(on_writer(gateway.control.store.ping), 5.0)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["store"] = f"not answering: {type(exc).__name__}"
        if bridge is not None:
            checks["bridge"] = "ok" if bridge.stats.connected else "not connected to the broker"
        drivers = gateway.executor.drivers if gateway.executor is not None else {}
        missing = [c.name for c in gateway.channels if c.name not in drivers]
        checks["channels"] = "ok" if not missing else f"not bound: {', '.join(missing)}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    # -- who -------------------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/whoami", tags=["auth"])
    async def whoami(who: Identity = role("view")):
        return {"name": who.name, "role": who.role, "allowed": sorted(a for a in ACTIONS if who.at_least(ACTIONS[a]))}

    # -- meters ----------------------------------------------------------------------------------------
    def _meter_rows(relay, band, limit, offset):
        """One page of the store's meters (by meter id) with their band; -> (the rows in ``band``, rows read)."""
        cc = gateway.control
        e = cc.engine
        rows = cc.store.meters_page(relay, limit, offset)
        out = []
        for meter_id, account_id, protocol, channel, relay_state, verified_at in rows:
            a = e.account_no.get(account_id)
            b = BAND_NAMES[int(e.state[a])] if a is not None else "unknown"
            if band is not None and b != band:
                continue
            out.append({"meter_id": meter_id, "account_id": account_id, "protocol": protocol, "channel": channel,
                        "relay": relay_state, "relay_verified_at": verified_at, "band": b,
                        "balance_fen": e.balance_of(account_id) if a is not None else None})
        return out, len(rows)

    async def _meter_list(relay, band, limit, offset):
        if band is None:
            return (await on_writer(_meter_rows, relay, None, limit, offset))[0]
        # the band is the engine's, not a column: scan the meters in slices, each a short call on the writer,
        # so a request over 100,000 meters never holds payments up for long
        found, scanned = [], 0
        while len(found) < offset + limit:
            rows, n = await on_writer(_meter_rows, relay, band, BAND_SCAN, scanned)
            found += rows
            scanned += n
            if n < BAND_SCAN:
                break
        return found[offset:offset + limit]

    @app.get(f"{PREFIX}/meters", tags=["meters"], summary="meters with their relay state and balance band")
    async def meters(who: Identity = role("view"),
                     state: Annotated[Literal["open", "closed", "unknown"] | None,
                                      Query(description="relay state")] = None,
                     band: Annotated[Literal[BAND_NAMES] | None, Query(description="the account's balance band")] = None,
                     limit: Limit = 100, offset: Offset = 0):
        return _page(await _meter_list(state, band, limit, offset), limit, offset)

    def _known_meter(meter_id: str):
        if meter_id not in gateway.control.engine.meter_no:
            raise ApiError(404, f"unknown meter {meter_id!r}", "path.meter_id")
        return gateway.control.engine.meter(meter_id)

    def _meter_detail(meter_id: str, now: float):
        cc = gateway.control
        m = _known_meter(meter_id)
        why = cc.why(meter_id)
        readings = [{"t": t, "total_wh": tw, "sharp_wh": s, "peak_wh": p, "flat_wh": f, "valley_wh": v,
                     "balance_fen": b} for t, tw, s, p, f, v, b in
                    cc.store.recent_readings(meter_id, int(now) - READINGS_WINDOW_S)]
        return {"meter_id": meter_id, "account": _account(m.account_id), "protocol": m.protocol,
                "channel": m.channel, "reconnect_mode": m.reconnect_mode,
                "relay": {"state": why.relay, "verified_at": why.verified_at, "keep_power": why.keep_power},
                "why": _plain(why), "last_readings": readings,
                "commands": [_plain(c) for c in cc.store.meter_commands(meter_id, 10)]}

    @app.get(f"{PREFIX}/meters/{{meter_id}}", tags=["meters"],
             summary="one meter: account, balance, last readings, relay state and why it is open")
    async def meter(meter_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        return await on_writer(_meter_detail, meter_id, clock.now())

    @app.get(f"{PREFIX}/meters/{{meter_id}}/why", tags=["meters"], summary="why is this meter off (or on)?")
    async def meter_why(meter_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        def why():
            _known_meter(meter_id)
            return _plain(gateway.control.why(meter_id))
        return await on_writer(why)

    @app.post(f"{PREFIX}/meters/{{meter_id}}/read", tags=["meters"],
              summary="read the meter now on its line; the reading is committed like a poll's")
    async def meter_read(meter_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("read_meter")):
        await on_writer(_known_meter, meter_id)
        try:
            reading = await gateway.read_meter(meter_id)
        except LookupError as exc:
            raise ApiError(409, str(exc)) from None
        taken = reading.taken_at  # meters keep the utility's local time: say which
        if taken.tzinfo is None:
            taken = taken.replace(tzinfo=timezone(timedelta(seconds=gateway.config.calendar.utc_offset_s)))
        return {"meter_id": reading.meter, "taken_at": taken.isoformat(), "t": int(taken.timestamp()),
                "channel": reading.channel,
                "values": _plain(reading.values), "errors": reading.errors, "answered": bool(reading.values)}

    @app.post(f"{PREFIX}/meters/{{meter_id}}/close", tags=["relay"], status_code=202,
              summary="reconnect (close) now: a relay command, audited; no second person needed")
    async def meter_close(meter_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], body: CloseBody,
                          who: Identity = role("close")):
        def close(now):
            _known_meter(meter_id)
            return gateway.control.manual(meter_id, RelayAction.CLOSE, who.name, who.role, body.reason,
                                          body.key or uuid.uuid4().hex, now, body.mode)
        try:
            command = await on_writer(close, clock.now())
        except AuthorityError as exc:
            raise ApiError(403, str(exc)) from None
        gateway.executor.wake()
        return _plain(command)

    @app.post(f"{PREFIX}/meters/{{meter_id}}/disconnect", tags=["relay"], status_code=202,
              summary="request a manual disconnect: a supervisor who is not you approves it")
    async def meter_disconnect(meter_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], body: DisconnectBody,
                               who: Identity = role("request_disconnect")):
        return await _request([meter_id], body, who, "path.meter_id")

    @app.post(f"{PREFIX}/disconnect-plans", tags=["relay"], status_code=202,
              summary="request a batch disconnect of many meters: one approval for the plan")
    async def disconnect_plan(body: PlanBody, who: Identity = role("request_disconnect")):
        return await _request(body.meter_ids, body, who, "body.meter_ids")

    async def _request(meter_ids, body: DisconnectBody, who: Identity, field: str):
        try:
            req = await on_writer(approvals().request, meter_ids, who.name, who.role, body.reason, clock.now(),
                                  body.key)
        except KeyError as exc:
            raise ApiError(404, exc.args[0], field) from None
        except KeyInUse as exc:
            raise ApiError(409, str(exc), "body.key") from None
        except ApprovalError as exc:
            raise ApiError(403 if isinstance(exc, NotPermitted) else 422, str(exc)) from None
        return {**_request_view(req, clock.now()), "message": f"request {req.request_id} awaits approval by a "
                                                               f"supervisor other than {who.name}"}

    # -- approval requests -----------------------------------------------------------------------------
    def _request_view(req, now):
        return {**_plain(req), "state": req.state_at(now).value}

    @app.get(f"{PREFIX}/requests", tags=["relay"], summary="disconnect requests, newest first")
    async def requests(who: Identity = role("view"),
                       state: Annotated[Literal["pending", "approved", "rejected", "expired"] | None, Query()] = None,
                       limit: Limit = 100, offset: Offset = 0):
        now = clock.now()
        found = await on_writer(gateway.control.store.approval_requests, state, now, limit, offset)
        return _page([_request_view(r, now) for r in found], limit, offset)

    @app.get(f"{PREFIX}/requests/{{request_id}}", tags=["relay"])
    async def request_one(request_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        req = await _get_request(request_id)
        return _request_view(req, clock.now())

    async def _get_request(request_id):
        try:
            return await on_writer(approvals().get, request_id)
        except KeyError as exc:
            raise ApiError(404, exc.args[0], "path.request_id") from None

    @app.post(f"{PREFIX}/requests/{{request_id}}/approve", tags=["relay"],
              summary="approve someone else's disconnect request: the trip commands are made with the approval")
    async def approve(request_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], body: ReasonBody,
                      who: Identity = role("decide")):
        req, refused = await _decide(approvals().approve, request_id, who, body.reason)
        gateway.executor.wake()
        return {**_request_view(req, clock.now()), "refused": refused}

    @app.post(f"{PREFIX}/requests/{{request_id}}/reject", tags=["relay"])
    async def reject(request_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], body: ReasonBody,
                     who: Identity = role("decide")):
        req = await _decide(approvals().reject, request_id, who, body.reason)
        return _request_view(req, clock.now())

    async def _decide(fn, request_id, who: Identity, reason):
        try:
            return await on_writer(fn, request_id, who.name, who.role, reason, clock.now())
        except KeyError as exc:
            raise ApiError(404, exc.args[0], "path.request_id") from None
        except NotPermitted as exc:
            raise ApiError(403, str(exc)) from None
        except NotPending as exc:
            raise ApiError(409, str(exc)) from None
        except ApprovalError as exc:
            raise ApiError(422, str(exc)) from None

    # -- accounts --------------------------------------------------------------------------------------
    def _account(account_id: str):
        e = gateway.control.engine
        a = e.account_no.get(account_id)
        if a is None:
            raise ApiError(404, f"unknown account {account_id!r}", "path.account_id")
        acct = e.accounts[a]
        balance, trip = e.balance_and_level(account_id)
        return {"account_id": account_id, "customer_class": acct.customer_class.value, "mode": acct.mode.value,
                "tariff_id": acct.tariff_id, "area": acct.area, "name": acct.name, "address": acct.address,
                "balance_fen": balance, "band": BAND_NAMES[int(e.state[a])], "trip_level_fen": trip,
                "meters": [m.meter_id for m in e.meters_of_account(account_id)]}

    @app.get(f"{PREFIX}/accounts/{{account_id}}", tags=["accounts"], summary="an account: balance, band, meters")
    async def account(account_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        return await on_writer(_account, account_id)

    @app.get(f"{PREFIX}/accounts/{{account_id}}/statement", tags=["accounts"],
             summary="charges and credits from `since` on, with what settled what")
    async def statement(account_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view"),
                        since: Annotated[int, Query(ge=0, le=2**40, description="epoch seconds")] = 0):
        def run():
            _account(account_id)
            return _plain(gateway.control.store.statement(account_id, since))
        return await on_writer(run)

    @app.post(f"{PREFIX}/accounts/{{account_id}}/adjustments", tags=["accounts"], status_code=201,
              summary="credit (or, admin only, refund) an account; the adjustment id makes it idempotent")
    async def adjustment(account_id: Annotated[str, Path(max_length=128, pattern=f"^{ID_CHAR}+$")], body: AdjustmentBody,
                         who: Identity = role("adjustment")):
        kind = "refund" if body.amount_fen < 0 else "adjustment"
        if kind == "refund" and not who.at_least(ACTIONS["refund"]):
            raise ApiError(403, f"a refund (negative amount) needs the role {ACTIONS['refund']}", "body.amount_fen")
        now = clock.now()
        try:
            item = Adjustment(body.adjustment_id, account_id, body.amount_fen, int(now), who.name, body.reason, kind)
        except MoneyError as exc:
            raise ApiError(422, str(exc), "body.amount_fen") from None

        def run(now):
            _account(account_id)
            return gateway.control.ingest_credits([item], now, who.role)
        result = await on_writer(run, now)
        gateway.executor.wake()
        credits = result.credits
        if credits.conflicts:
            raise ApiError(409, credits.conflicts[0][1], "body.adjustment_id")
        balance = await on_writer(gateway.control.engine.balance_of, account_id)
        return {"adjustment_id": body.adjustment_id, "account_id": account_id, "kind": kind,
                "amount_fen": body.amount_fen, "duplicate": bool(credits.duplicates), "balance_fen": balance}

    # -- commands and field orders ---------------------------------------------------------------------
    @app.get(f"{PREFIX}/commands", tags=["relay"], summary="relay commands, newest first")
    async def commands(who: Identity = role("view"),
                       state: Annotated[Literal["queued", "sending", "verifying", "confirmed", "retry_wait", "failed",
                                                "dispatched", "cancelled", "blocked"] | None, Query()] = None,
                       meter_id: Annotated[str | None, Query(max_length=128, pattern=f"^{ID_CHAR}+$")] = None,
                       limit: Limit = 100, offset: Offset = 0):
        found = await on_writer(gateway.control.store.commands_page, state, meter_id, limit, offset)
        return _page([_plain(c) for c in found], limit, offset)

    async def _command(command_id: str):
        found = await on_writer(gateway.control.store.command, command_id)
        if found is None:
            raise ApiError(404, f"unknown command {command_id!r}", "path.command_id")
        return found

    @app.get(f"{PREFIX}/commands/{{command_id}}", tags=["relay"])
    async def command(command_id: Annotated[str, Path(max_length=300, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        return _plain(await _command(command_id))

    @app.post(f"{PREFIX}/commands/{{command_id}}/cancel", tags=["relay"],
              summary="stop a relay command that is not on the wire yet")
    async def cancel(command_id: Annotated[str, Path(max_length=300, pattern=f"^{ID_CHAR}+$")], body: ReasonBody,
                     who: Identity = role("cancel")):
        try:
            c = await on_writer(gateway.control.cancel, command_id, who.name, who.role, body.reason, clock.now())
        except KeyError as exc:
            raise ApiError(404, exc.args[0], "path.command_id") from None
        except ValueError as exc:
            raise ApiError(409, str(exc)) from None
        return _plain(c)

    @app.get(f"{PREFIX}/orders", tags=["field"], summary="open field work orders, most urgent first")
    async def orders(who: Identity = role("view"), limit: Limit = 100, offset: Offset = 0):
        found = await on_writer(gateway.control.controller.orders_by_urgency)
        return _page([_plain(o) for o in found[offset:offset + limit]], limit, offset)

    @app.get(f"{PREFIX}/orders/{{order_id}}", tags=["field"])
    async def order(order_id: Annotated[str, Path(max_length=300, pattern=f"^{ID_CHAR}+$")], who: Identity = role("view")):
        found = await on_writer(gateway.control.store.order, order_id)
        if found is None:
            raise ApiError(404, f"unknown order {order_id!r}", "path.order_id")
        return _plain(found)

    # -- area flags ------------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/area-flags", tags=["areas"], summary="area flags in force or cleared")
    async def area_flags(who: Identity = role("view")):
        flags = await on_writer(lambda: list(gateway.control.controller.conditions.flags.values()))
        return {"items": [_plain(f) for f in sorted(flags, key=lambda f: (f.area, f.flag))]}

    @app.post(f"{PREFIX}/area-flags", tags=["areas"],
              summary="set or clear an area flag: no automatic trips in a flagged area while it is active")
    async def set_area_flag(body: AreaFlagBody, who: Identity = role("area_flag")):
        now = clock.now()
        flag = AreaFlag(body.area, body.flag, body.active, int(now), body.until, who.name, body.reason)

        def set_flag():
            # the controller refuses it too (over MQTT: a dead letter); here it is a 404 naming the field
            if not gateway.control.engine.has_area(flag.area):
                raise ApiError(404, f"unknown area {flag.area!r}: no account is in it", "body.area")
            return gateway.control.set_area_flag(flag, now, who.role)

        fx = await on_writer(set_flag)
        gateway.executor.wake()
        if fx.rejected:
            raise ApiError(409, fx.rejected[0][1])
        return _plain(flag)

    # -- audit -----------------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/audit", tags=["audit"], summary="audit records, newest first")
    async def audit(who: Identity = role("audit"),
                    subject: Annotated[str | None, Query(max_length=300, pattern=f"^{ID_CHAR}+$")] = None,
                    action: Annotated[str | None, Query(max_length=100, pattern=f"^{ID_CHAR}+$")] = None,
                    before: Annotated[int | None, Query(ge=0, le=2**62, description="records before this seq")] = None,
                    limit: Limit = 100):
        rows = await on_writer(gateway.control.store.audit_page, subject, action, before, limit)
        items = [{"seq": s, "at": at, "actor": actor, "role": r, "action": a, "subject": subj, "reason": reason,
                  "detail": detail, "hash": h} for s, at, actor, r, a, subj, reason, detail, h in rows]
        return {"items": items, "next_before": items[-1]["seq"] if len(items) == limit else None}

    @app.get(f"{PREFIX}/audit/verify", tags=["audit"], summary="check the audit log's hash chain")
    async def audit_verify(who: Identity = role("audit")):
        walk = ChainWalk()  # a page per writer call: payments and commands go on between them
        while (report := await on_writer(walk.step, gateway.control.store)) is None:
            pass
        return {**dataclasses.asdict(report), "message": report.describe()}

    return app


class _Embedded(uvicorn.Server):
    """uvicorn on someone else's event loop: the process's owner (the service, the demo) handles signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class ApiServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: _Embedded | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listening when this returns; the bound port. An address that cannot be bound raises OSError."""
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, RedactTokens) for f in logger.filters):
                logger.addFilter(RedactTokens())
        sock = socket.create_server((self.host, self.port), reuse_port=False)
        sock.setblocking(False)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=True,
                                server_header=False, timeout_graceful_shutdown=5)
        self._server = _Embedded(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="feikong-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the API server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None


class ApiComponent:
    """The operator API as an ops component of :class:`gateway.service.Service` (its ``start(service)`` /
    ``stop()`` seam): listens on ``[http]`` host and port, with the tokens of ``[http] tokens_file``."""

    name = "operator API"

    def __init__(self, request_ttl_s: float = DEFAULT_TTL_S) -> None:
        self.request_ttl_s = request_ttl_s
        self.server: ApiServer | None = None
        self.port: int | None = None

    async def start(self, service) -> None:
        http = service.config.http
        if http.tokens_file:
            tokens = Tokens.load(http.tokens_file)
        else:  # health and readiness still answer (the container's probe); every operator call is refused
            log.warning("operator API without [http] tokens_file: every call but /health and /ready is refused "
                        "(make one with: feikong token add NAME --role ROLE --file FILE)")
            tokens = Tokens()
        app = create_app(service.gateway, tokens, bridge=service.bridge, request_ttl_s=self.request_ttl_s)
        self.server = ApiServer(app, http.host, http.port)
        self.port = await self.server.start()
        log.info("operator API on http://%s:%d/api/v1 (OpenAPI at /openapi.json)", http.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
