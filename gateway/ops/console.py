"""The operator console: ``feikong meter|meters|relay|requests|orders|audit|token ...``, a client of the operator
API.

It talks to the API over HTTP (stdlib urllib): ``--api URL`` (default ``$FEIKONG_API``, else
http://127.0.0.1:8080) with the token from ``--token-file`` or ``$FEIKONG_TOKEN``. Lists print as tables
(rich). An error from the API prints as one line: exit 1 for a refused or bad request (4xx), 2 when the API
cannot be reached or failed. ``feikong audit verify --store URL`` (or ``--config FILE``) checks the chain offline against the store,
and ``feikong token add`` makes tokens; neither needs the API.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone

DEFAULT_API = "http://127.0.0.1:8080"
EXIT_OK, EXIT_REFUSED, EXIT_FAILED = 0, 1, 2


class ApiCallError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def exit_code(self) -> int:
        return EXIT_REFUSED if self.status is not None and 400 <= self.status < 500 else EXIT_FAILED


class ApiClient:
    """A small JSON client of the operator API."""

    def __init__(self, base: str, token: str | None, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None):
        """The response's JSON; :class:`ApiCallError` with the API's own message for a 4xx or 5xx."""
        status, data = self.request(method, path, body, query)
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiCallError(f"{method} {path}: {status} {message or 'error'}", status)
        return data

    def request(self, method: str, path: str, body=None, query: dict | None = None) -> tuple[int, object]:
        """``(status, JSON body)`` whatever the status; :class:`ApiCallError` when the API cannot be reached.
        ``body``: JSON-ready data, or bytes sent as they are."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiCallError(f"cannot reach the API at {self.base}: {reason}") from None


def _json(raw: bytes):
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return {"error": raw[:200].decode(errors="replace")}


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def client_from(args) -> ApiClient:
    token = os.environ.get("FEIKONG_TOKEN")
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as exc:
            raise ApiCallError(f"--token-file {args.token_file}: {exc.strerror}", 400) from None
    if not token:
        raise ApiCallError("no token: give --token-file FILE or set FEIKONG_TOKEN", 400)
    return ApiClient(args.api or os.environ.get("FEIKONG_API") or DEFAULT_API, token)


# ------------------------------------------------------------------ output


def _when(t) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(float(t), timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _yuan(fen) -> str:
    return "-" if fen is None else f"{fen / 100:.2f}"


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, no_wrap=i == 0)  # ids whole: they are copied into the next command
    for r in rows:
        table.add_row(*["-" if v is None else str(v) for v in r])
    # a terminal's own width; piped or redirected, wide enough that lines are not folded for grep
    Console(width=None if sys.stdout.isatty() else 200).print(table)


# ------------------------------------------------------------------ commands


def _meter_why(api: ApiClient, args) -> int:
    why = api.call("GET", f"/api/v1/meters/{_q(args.meter)}/why")
    print(f"meter {why['meter_id']}: relay {why['relay']}")
    print(why["summary"])
    return EXIT_OK


def _meter_show(api: ApiClient, args) -> int:
    m = api.call("GET", f"/api/v1/meters/{_q(args.meter)}")
    a = m["account"]
    print(f"meter {m['meter_id']} ({m['protocol']} on {m['channel']}), account {a['account_id']} ({a['customer_class']})")
    print(f"balance {_yuan(a['balance_fen'])} yuan, band {a['band']}, trip level {_yuan(a['trip_level_fen'])} yuan")
    print(f"relay {m['relay']['state']} (verified {_when(m['relay']['verified_at'])})"
          + (", keep-power on" if m["relay"]["keep_power"] else ""))
    print(f"why: {m['why']['summary']}")
    if m["last_readings"]:
        _table("last readings", ["time", "total kWh", "balance"],
               [[_when(r["t"]), f"{r['total_wh'] / 1000:.2f}", _yuan(r["balance_fen"])] for r in m["last_readings"]])
    if m["commands"]:
        _table("relay commands", ["command", "action", "state", "actor", "created"],
               [[c["command_id"], c["action"], c["state"], c["actor"], _when(c["created_at"])] for c in m["commands"]])
    return EXIT_OK


def _meter_read(api: ApiClient, args) -> int:
    r = api.call("POST", f"/api/v1/meters/{_q(args.meter)}/read")
    if not r["answered"]:
        print(f"meter {r['meter_id']} did not answer: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()),
              file=sys.stderr)
        return EXIT_FAILED
    print(f"meter {r['meter_id']} read at {r['taken_at']} on {r['channel']}")
    _table("values", ["item", "value"], [[k, json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v]
                                         for k, v in r["values"].items()])
    for k, v in r["errors"].items():
        print(f"  {k}: not read: {v}")
    return EXIT_OK


def _relay_trip(api: ApiClient, args) -> int:
    body = {"reason": args.reason, "key": args.key}  # the same --key again: the request already made
    if len(args.meters) == 1:
        r = api.call("POST", f"/api/v1/meters/{_q(args.meters[0])}/disconnect", body)
    else:
        r = api.call("POST", "/api/v1/disconnect-plans", {**body, "meter_ids": args.meters})
    print(f"request {r['request_id']}: disconnect of {len(r['meter_ids'])} meter(s) awaits approval by a "
          f"supervisor other than {r['requested_by']} (expires {_when(r['expires_at'])})")
    return EXIT_OK


def _relay_close(api: ApiClient, args) -> int:
    c = api.call("POST", f"/api/v1/meters/{_q(args.meter)}/close",
                 {"reason": args.reason, "key": args.key or uuid.uuid4().hex})
    print(f"close command {c['command_id']} for meter {c['meter_id']}: {c['state']}")
    return EXIT_OK


def _relay_decide(api: ApiClient, args) -> int:
    verb = "approve" if args.relay == "approve" else "reject"
    r = api.call("POST", f"/api/v1/requests/{_q(args.request)}/{verb}", {"reason": args.reason})
    print(f"request {r['request_id']} {r['state']} by {r['decided_by']}")
    for cid in r.get("command_ids") or ():
        print(f"  trip command {cid}")
    for meter, why in (r.get("refused") or {}).items():
        print(f"  meter {meter} refused: {why}")
    return EXIT_OK


def _relay_cancel(api: ApiClient, args) -> int:
    c = api.call("POST", f"/api/v1/commands/{_q(args.command)}/cancel", {"reason": args.reason})
    print(f"command {c['command_id']}: {c['state']} ({c['outcome']})")
    return EXIT_OK


def _requests(api: ApiClient, args) -> int:
    page = api.call("GET", "/api/v1/requests", query={"state": args.state, "limit": args.limit})
    _table("disconnect requests", ["request", "state", "meters", "requested by", "reason", "expires", "decided by"],
           [[r["request_id"], r["state"], ", ".join(r["meter_ids"][:3]) + (" ..." if len(r["meter_ids"]) > 3 else ""),
             r["requested_by"], r["reason"], _when(r["expires_at"]), r["decided_by"] or None] for r in page["items"]])
    return EXIT_OK


def _meters(api: ApiClient, args) -> int:
    page = api.call("GET", "/api/v1/meters", query={"state": args.state, "band": args.band, "limit": args.limit,
                                                     "offset": args.offset})
    _table("meters", ["meter", "account", "relay", "verified", "band", "balance", "channel"],
           [[m["meter_id"], m["account_id"], m["relay"], _when(m["relay_verified_at"]), m["band"],
             _yuan(m["balance_fen"]), m["channel"]] for m in page["items"]])
    if page["next_offset"] is not None:
        print(f"more: --offset {page['next_offset']}")
    return EXIT_OK


def _orders(api: ApiClient, args) -> int:
    page = api.call("GET", "/api/v1/orders", query={"limit": args.limit})
    _table("field orders (most urgent first)", ["order", "kind", "meter", "state", "escalation", "deadline", "address"],
           [[o["order_id"], o["kind"], o["meter_id"], o["state"], o["escalation"], _when(o["deadline_at"]),
             o["address"]] for o in page["items"]])
    return EXIT_OK


def _audit_verify(args) -> int:
    from gateway.store import open_store

    from .audit import verify_chain

    url, where = args.store, "--store"
    if args.config:
        from gateway.config import ConfigError, load_service_config

        try:
            url, where = load_service_config(args.config).store.url, f"{args.config} [store] url"
        except ConfigError as exc:
            print(f"feikong: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    try:
        store = open_store(url)
    except (ValueError, ConnectionError, OSError) as exc:
        print(f"feikong: error: {where}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = verify_chain(store)
    finally:
        store.close()
    print(report.describe(), file=sys.stdout if report.ok else sys.stderr)
    return EXIT_OK if report.ok else EXIT_REFUSED


def _token_add(args) -> int:
    from pathlib import Path

    from .auth import TokenFileError, Tokens

    try:
        path = Path(args.file)
        tokens = Tokens.load(path) if path.exists() else Tokens({}, path)
        token = tokens.add(args.name, args.role)
    except (TokenFileError, OSError) as exc:
        print(f"feikong: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(token)
    print(f"token for {args.name} ({args.role}) added to {args.file}; it is shown only this once", file=sys.stderr)
    return EXIT_OK


def _token_list(args) -> int:
    from .auth import TokenFileError, Tokens

    try:
        names = Tokens.load(args.file).names()
    except TokenFileError as exc:
        print(f"feikong: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    _table(f"tokens in {args.file}", ["name", "role"], sorted(names.items()))
    return EXIT_OK


def _token_remove(args) -> int:
    from .auth import TokenFileError, Tokens

    try:
        Tokens.load(args.file).remove(args.name)
    except (TokenFileError, KeyError) as exc:
        print(f"feikong: error: {exc.args[0]}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"token of {args.name} removed from {args.file}: it is refused from now on")
    return EXIT_OK


def _via_api(fn):
    def run(args) -> int:
        try:
            return fn(client_from(args), args)
        except ApiCallError as exc:
            print(f"feikong: error: {exc}", file=sys.stderr)
            return exc.exit_code
    return run


# ------------------------------------------------------------------ parser


def add_commands(subparsers) -> None:
    """The console's commands on ``feikong``'s subparsers."""
    from gateway.core.control import ROLES

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--api", default=None, help=f"the operator API (default $FEIKONG_API, else {DEFAULT_API})")
    api.add_argument("--token-file", default=None, help="file holding your token (else the token itself in $FEIKONG_TOKEN)")
    reason = argparse.ArgumentParser(add_help=False)
    reason.add_argument("--reason", required=True, help="why (recorded in the audit log)")

    meter = subparsers.add_parser("meter", help="one meter: why is it off, read it now, show it")
    msub = meter.add_subparsers(dest="meter_cmd", required=True)
    for name, fn, text in (("why", _meter_why, "why is this meter off (or on)?"),
                           ("read", _meter_read, "read the meter now on its line"),
                           ("show", _meter_show, "account, balance, readings, relay, commands")):
        p = msub.add_parser(name, parents=[api], help=text)
        p.add_argument("meter", metavar="ID")
        p.set_defaults(run=_via_api(fn))

    relay = subparsers.add_parser("relay", help="manual relay work (a disconnect needs a second person)")
    rsub = relay.add_subparsers(dest="relay", required=True)
    p = rsub.add_parser("trip", parents=[api, reason], help="request a disconnect of one or more meters")
    p.add_argument("meters", metavar="ID", nargs="+")
    p.add_argument("--key", default=None, help="idempotency key: the same key again is the request already made")
    p.set_defaults(run=_via_api(_relay_trip))
    p = rsub.add_parser("close", parents=[api, reason], help="reconnect a meter now")
    p.add_argument("meter", metavar="ID")
    p.add_argument("--key", default=None, help="idempotency key (default: a new one)")
    p.set_defaults(run=_via_api(_relay_close))
    for name in ("approve", "reject"):
        p = rsub.add_parser(name, parents=[api, reason], help=f"{name} someone else's disconnect request")
        p.add_argument("request", metavar="REQ")
        p.set_defaults(run=_via_api(_relay_decide))
    p = rsub.add_parser("cancel", parents=[api, reason], help="stop a relay command not yet on the wire")
    p.add_argument("command", metavar="CMD")
    p.set_defaults(run=_via_api(_relay_cancel))

    p = subparsers.add_parser("requests", parents=[api], help="disconnect requests, newest first")
    p.add_argument("--state", choices=["pending", "approved", "rejected", "expired"], default=None)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=_via_api(_requests))
    p = subparsers.add_parser("meters", parents=[api], help="meters with relay state, band and balance")
    p.add_argument("--state", choices=["open", "closed", "unknown"], default=None, help="relay state")
    p.add_argument("--band", choices=["normal", "warning_1", "warning_2", "trip"], default=None)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(run=_via_api(_meters))
    p = subparsers.add_parser("orders", parents=[api], help="open field work orders, most urgent first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=_via_api(_orders))

    audit = subparsers.add_parser("audit", help="the audit log")
    asub = audit.add_subparsers(dest="audit", required=True)
    p = asub.add_parser("verify", help="check the audit log's hash chain against the store (offline)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="sqlite:///PATH or postgresql://USER@HOST/DB")
    where.add_argument("--config", metavar="FILE", help="the gateway config whose [store] to check")
    p.set_defaults(run=_audit_verify)

    token = subparsers.add_parser("token", help="operator tokens for the API")
    tsub = token.add_subparsers(dest="token", required=True)
    p = tsub.add_parser("add", help="make a token (printed once; the file keeps only its hash)")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--file", required=True, help="the tokens file (TOML), made if missing")
    p.set_defaults(run=_token_add)
    p = tsub.add_parser("list", help="who has a token, in which role")
    p.add_argument("--file", required=True)
    p.set_defaults(run=_token_list)
    p = tsub.add_parser("remove", help="withdraw someone's token (a running API refuses it at once)")
    p.add_argument("name")
    p.add_argument("--file", required=True)
    p.set_defaults(run=_token_remove)
