"""The fleet file: accounts and their meters, one CSV row per meter (docs/deployment.md, Fleet file).

Rows for the same account repeat its id; the account's columns are taken from its first row, and a later
row that fills one in differently is an error. An account without a meter is a row with an empty
``meter_id``. Every error names the file, the line and column, and what is allowed; all are reported.
"""
from __future__ import annotations

import csv
from pathlib import Path

from gateway.core.model import Account, CostControlMode, CustomerClass, Meter, MoneyError, yuan_to_fen
from protocols.dlt645.frame import normalise_address

#: the columns, in the order the example writes them; ``account_id`` and ``tariff`` are required
COLUMNS = ("account_id", "class", "mode", "tariff", "area", "name", "address", "lat", "lon", "notice_channels",
           "contacts", "overdraft_yuan", "meter_id", "channel", "device_id", "max_kw", "reconnect_mode")
ACCOUNT_COLUMNS = COLUMNS[:12]
REQUIRED = ("account_id", "tariff")
RECONNECT_MODES = ("direct", "close_allowed")


class _Bad(Exception):
    pass


def read_fleet(path: Path, channels: dict, tariffs: set[str], notice_channels: set[str],
               problems: list[str]) -> tuple[list[Account], list[Meter], dict[str, int]]:
    """Accounts, meters and the Modbus meters' device ids (meter id -> unit id) from ``path``; ``channels``
    (name -> channel config) are the ones the meters may name, ``tariffs`` the tariff ids,
    ``notice_channels`` the policies' channels. Errors go to ``problems``."""
    accounts: dict[str, tuple[Account, int, dict]] = {}  # id -> (account, line, its cells)
    meters: list[Meter] = []
    meter_line: dict[str, int] = {}
    devices: dict[tuple[str, int], tuple[str, int]] = {}  # (channel, device id) -> (meter, line)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
        return [], [], {}
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            problems.append(f"{path}:1: empty file; the first line names the columns: {', '.join(COLUMNS)}")
            return [], [], {}
        header = [h.strip() for h in header]
        bad_header = False
        for col, name in enumerate(header, 1):
            if name not in COLUMNS:
                problems.append(f"{path}:1:{col}: unknown column {name!r}; allowed: {', '.join(COLUMNS)}")
                bad_header = True
            elif header.index(name) != col - 1:
                problems.append(f"{path}:1:{col}: column {name!r} appears twice")
                bad_header = True
        for name in REQUIRED:
            if name not in header:
                problems.append(f"{path}:1: the column {name!r} is required; columns: {', '.join(COLUMNS)}")
                bad_header = True
        if bad_header:
            return [], [], {}
        index = {name: i for i, name in enumerate(header)}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(f"{path}:{line}: {len(row)} cells; the header names {len(header)}")
                continue

            def where(name: str) -> str:
                return f"{path}:{line}:{index[name] + 1}: {name}"

            cells = {name: row[i].strip() for name, i in index.items()}
            row_problems: list[str] = []

            def fail(name: str, message: str) -> None:
                row_problems.append(f"{where(name)}: {message}")

            known = accounts.get(cells["account_id"])
            if known is None:
                account = _account(cells, fail, tariffs, notice_channels)
                if account is not None:
                    accounts[account.account_id] = (account, line, cells)
            else:  # a further meter of an account: its columns may be left empty, or must agree
                account, first_line, first_cells = known
                for name in ACCOUNT_COLUMNS[1:]:
                    if cells.get(name, "") and cells[name] != first_cells.get(name, ""):
                        fail(name, f"{cells[name]!r}, but account {account.account_id} has "
                                   f"{first_cells.get(name, '')!r} on line {first_line} (leave it empty on its "
                                   f"other rows)")
            meter = _meter(cells, fail, channels, index)
            if meter is not None and meter.meter_id in meter_line:
                fail("meter_id", f"{meter.meter_id} is on line {meter_line[meter.meter_id]} already")
            elif meter is not None:
                device = cells.get("device_id", "")
                if device:
                    key = (meter.channel, int(device))
                    if key in devices:
                        other, other_line = devices[key]
                        fail("device_id", f"{device} is meter {other}'s on {meter.channel} (line {other_line}); "
                                          f"device ids are unique on a line")
                    devices.setdefault(key, (meter.meter_id, line))
                meter_line[meter.meter_id] = line  # a duplicate is found even if this row has other errors
                if not row_problems and account is not None:
                    meters.append(meter)
            problems.extend(row_problems)
    return [a for a, _, _ in accounts.values()], meters, {m: d for (_, d), (m, _) in devices.items()}


def _account(cells: dict, fail, tariffs: set[str], notice_channels: set[str]) -> Account | None:
    kw: dict = {}
    ok = True

    def bad(name, message):
        nonlocal ok
        ok = False
        fail(name, message)

    kw["account_id"] = cells["account_id"]
    if not kw["account_id"]:
        bad("account_id", "empty; every row names its account")
    tariff = cells.get("tariff", "")
    if tariff or "tariff" in cells:
        if tariff not in tariffs:
            bad("tariff", f"{tariff!r} is not in the tariffs file; allowed: {', '.join(sorted(tariffs)) or '(none)'}")
        kw["tariff_id"] = tariff
    for name, enum, key in (("class", CustomerClass, "customer_class"), ("mode", CostControlMode, "mode")):
        value = cells.get(name, "")
        if value:
            try:
                kw[key] = enum(value)
            except ValueError:
                bad(name, f"{value!r} is not allowed; allowed: {', '.join(e.value for e in enum)}")
    for name in ("area", "name", "address"):
        if name in cells:
            kw[name] = cells[name]
    for name, lo, hi in (("lat", -90, 90), ("lon", -180, 180)):
        value = cells.get(name, "")
        if value:
            try:
                number = float(value)
            except ValueError:
                bad(name, f"{value!r} is not a number (decimal degrees, {lo}..{hi})")
                continue
            if not lo <= number <= hi:
                bad(name, f"{value} is outside {lo}..{hi} (decimal degrees)")
            kw[name] = number
    if cells.get("notice_channels", ""):
        chosen = tuple(c.strip() for c in cells["notice_channels"].split(";") if c.strip())
        unknown = [c for c in chosen if c not in notice_channels]
        if unknown or not chosen:
            shown = ", ".join(map(repr, unknown)) + (" is not a notice channel" if len(unknown) == 1 else
                                                     " are not notice channels") if unknown else "none given"
            bad("notice_channels", f"{shown}; allowed (in order, separated by ;): {', '.join(sorted(notice_channels))}")
        kw["channels"] = chosen
    if cells.get("contacts", ""):
        contacts = {}
        for part in cells["contacts"].split(";"):
            channel, sep, address = part.partition("=")
            channel, address = channel.strip(), address.strip()
            if not sep or not channel or not address:
                bad("contacts", f"{part.strip()!r}: write CHANNEL=ADDRESS, separated by ; (sms=13800000000;"
                                f"email=a@example.cn)")
            elif channel not in notice_channels:
                bad("contacts", f"{channel!r} is not a notice channel; allowed: {', '.join(sorted(notice_channels))}")
            else:
                contacts[channel] = address
        kw["contacts"] = contacts
    if cells.get("overdraft_yuan", ""):
        try:
            fen = yuan_to_fen(cells["overdraft_yuan"])
            if fen < 0:
                raise MoneyError("negative")
            kw["overdraft_limit_fen"] = fen
        except MoneyError:
            bad("overdraft_yuan", f"{cells['overdraft_yuan']!r}; allowed: an amount of yuan >= 0 (at most 2 decimals)")
    return Account(**kw) if ok else None


def _meter(cells: dict, fail, channels: dict, index: dict) -> Meter | None:
    meter_id = cells.get("meter_id", "")
    if not meter_id:
        for name in ("channel", "device_id", "max_kw", "reconnect_mode"):
            if cells.get(name, ""):
                fail(name, "set, but the row has no meter_id (an account without a meter leaves it empty)")
        return None
    ok = True

    def bad(name, message):
        nonlocal ok
        ok = False
        fail(name, message)

    name = cells.get("channel", "")
    channel = channels.get(name)
    if channel is None and name in channels:  # a channel whose settings are wrong: reported there
        return None
    if channel is None:
        bad("channel" if "channel" in index else "meter_id",
            f"{name!r} is not a channel; allowed: the [[channels]] names: {', '.join(channels) or '(none configured)'}")
    kw = {"meter_id": meter_id, "account_id": cells["account_id"], "channel": name}
    if channel is not None:
        from gateway.config import DLT645_KINDS, channel_protocol

        kw["protocol"] = channel_protocol(channel)
        device = cells.get("device_id", "")
        if channel.kind in DLT645_KINDS:
            try:
                kw["meter_id"] = normalise_address(meter_id)
            except ValueError as exc:
                bad("meter_id", f"{meter_id!r}: {exc} (a DL/T 645 address: up to 12 digits)")
            if device:
                bad("device_id", f"set, but {name} ({channel.kind}) has no device ids; leave it empty")
        elif not device:
            bad("device_id" if "device_id" in index else "meter_id",
                f"required for a Modbus meter; allowed: 1..247")
        elif not device.isdigit() or not 1 <= int(device) <= 247:
            bad("device_id", f"{device!r}; allowed: 1..247 (the meter's Modbus unit id)")
    if cells.get("max_kw", ""):
        if not cells["max_kw"].isdigit() or int(cells["max_kw"]) <= 0:
            bad("max_kw", f"{cells['max_kw']!r}; allowed: a whole number of kW > 0")
        else:
            kw["max_kw"] = int(cells["max_kw"])
    mode = cells.get("reconnect_mode", "")
    if mode:
        if mode not in RECONNECT_MODES:
            bad("reconnect_mode", f"{mode!r} is not allowed; allowed: {', '.join(RECONNECT_MODES)}")
        kw["reconnect_mode"] = mode
    return Meter(**kw) if ok else None
