"""The operator API over a live gateway: roles, the two-person rule, manual close and cancel, adjustments, area
flags, on-demand reads, bad input and secrets. The real server (uvicorn on a free port), real meters on TCP."""
import asyncio
import logging
from datetime import datetime
from types import SimpleNamespace

from gateway.ops import api as api_module
from gateway.ops.api import ApiComponent
from gateway.ops.audit import verify_chain
from gateway.ops.console import ApiClient

from .api_fixtures import LiveApi, meter_address

M1, M2 = meter_address(0), meter_address(1)


async def audit_actions(api: LiveApi, subject: str) -> list[tuple]:
    rows = await api.gw.writer.call(api.gw.control.store.audit_log, subject)
    return [(r[2], r[3], r[4]) for r in rows]  # actor, role, action


async def test_a_disconnect_needs_a_second_person_and_trips_once(store_url, broker, tmp_path):
    async with LiveApi(store_url, broker, tmp_path) as api:
        req = await api.ok("olga", "POST", f"/api/v1/meters/{M1}/disconnect", {"reason": "tampering found"})
        rid = req["request_id"]
        assert (req["state"], req["meter_ids"], req["requested_by"]) == ("pending", [M1], "olga")
        assert "awaits approval" in req["message"]
        # an operator cannot approve; the requester cannot approve their own, whatever their role
        status, body = await api.call("oscar", "POST", f"/api/v1/requests/{rid}/approve", {"reason": "ok"})
        assert status == 403 and "supervisor" in body["error"]
        own = await api.ok("sam", "POST", f"/api/v1/meters/{M2}/disconnect", {"reason": "meter swap"})
        status, body = await api.call("sam", "POST", f"/api/v1/requests/{own['request_id']}/approve",
                                      {"reason": "mine"})
        assert status == 403 and "second person" in body["error"]
        assert not (await api.gw.writer.call(api.gw.control.store.meter_commands, M1))  # nothing made yet
        # a second person approves: the trip command is made with the approval and carried out
        done = await api.ok("sue", "POST", f"/api/v1/requests/{rid}/approve", {"reason": "seen the photos"})
        assert done["state"] == "approved" and done["decided_by"] == "sue" and len(done["command_ids"]) == 1
        await api.live.until(lambda: api.sims[0].relay_open, 20, "meter 1 tripped")
        # the approval again (a retry after a lost answer): the same answer, no second trip
        again = await api.ok("sue", "POST", f"/api/v1/requests/{rid}/approve", {"reason": "seen the photos"})
        assert again["command_ids"] == done["command_ids"]
        status, body = await api.call("sam", "POST", f"/api/v1/requests/{rid}/reject", {"reason": "late"})
        assert status == 409 and "approved by sue" in body["error"]
        cid = done["command_ids"][0]
        await api.live.until(lambda: api.gw.control.controller.commands[cid].state.value == "confirmed", 20)
        trips = [c for c in await api.gw.writer.call(api.gw.control.store.meter_commands, M1) if c.action.value == "trip"]
        assert [c.command_id for c in trips] == [cid]
        why = await api.ok("vera", "GET", f"/api/v1/meters/{M1}/why")
        assert why["relay"] == "open" and "olga (approved by sue)" in why["summary"] and "tampering" in why["summary"]
        # the audit log has who did what, in which role, and still verifies
        assert ("olga", "operator", "disconnect_requested") in await audit_actions(api, rid)
        assert ("sue", "supervisor", "disconnect_approved") in await audit_actions(api, rid)
        assert (await api.gw.writer.call(verify_chain, api.gw.control.store)).ok
        # a rejection makes nothing; a rejected request cannot be approved after
        rej = await api.ok("ada", "POST", f"/api/v1/requests/{own['request_id']}/reject", {"reason": "not needed"})
        assert rej["state"] == "rejected" and rej["command_ids"] == []
        status, _ = await api.call("sue", "POST", f"/api/v1/requests/{own['request_id']}/approve", {"reason": "x"})
        assert status == 409 and not api.sims[1].relay_open
        listed = await api.ok("vera", "GET", "/api/v1/requests", query={"state": "rejected"})
        assert [r["request_id"] for r in listed["items"]] == [own["request_id"]]


async def test_a_batch_plan_is_one_request_and_expires_unapproved(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path, request_ttl_s=1.0) as api:
        plan = await api.ok("olga", "POST", "/api/v1/disconnect-plans",
                            {"meter_ids": [M1, M2, M1], "reason": "feeder works"})
        assert plan["kind"] == "disconnect_plan" and plan["meter_ids"] == [M1, M2]
        status, body = await api.call("olga", "POST", "/api/v1/disconnect-plans",
                                      {"meter_ids": [M1, "NOPE"], "reason": "x"})
        assert status == 404 and "NOPE" in body["error"]
        # the same request again under its key (a retry after a lost answer) is the one already made
        keyed = {"meter_ids": [M1, M2], "reason": "feeder works", "key": "plan-7"}
        first = await api.ok("olga", "POST", "/api/v1/disconnect-plans", keyed)
        again = await api.ok("olga", "POST", "/api/v1/disconnect-plans", keyed)
        assert first["request_id"] == again["request_id"] == "req-plan-7"
        status, body = await api.call("olga", "POST", "/api/v1/disconnect-plans", {**keyed, "meter_ids": [M1]})
        assert status == 409 and "plan-7" in body["error"] and body["errors"][0]["field"] == "body.key"
        await asyncio.sleep(1.2)
        status, body = await api.call("sam", "POST", f"/api/v1/requests/{plan['request_id']}/approve",
                                      {"reason": "go"})
        assert status == 409 and "expired" in body["error"]
        assert (await api.ok("vera", "GET", f"/api/v1/requests/{plan['request_id']}"))["state"] == "expired"
        assert not any(s.relay_open for s in api.sims)


async def test_manual_close_needs_no_second_person_and_a_queued_command_can_be_cancelled(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        bus = api.gw.channels[0].name
        async with api.gw.executor.drivers[bus].reserved():  # the line busy: the command stays queued
            c = await api.ok("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "customer called", "key": "k1"})
            assert (c["action"], c["actor"], c["role"], c["state"]) == ("close", "olga", "operator", "queued")
            same = await api.ok("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "customer called", "key": "k1"})
            assert same["command_id"] == c["command_id"]
            status, _ = await api.call("vera", "POST", f"/api/v1/commands/{c['command_id']}/cancel", {"reason": "x"})
            assert status == 403
            gone = await api.ok("oscar", "POST", f"/api/v1/commands/{c['command_id']}/cancel",
                                {"reason": "wrong meter"})
            assert gone["state"] == "cancelled" and "oscar" in gone["outcome"]
        await asyncio.sleep(0.5)
        assert api.sims[0].relay_log == []  # never sent
        status, body = await api.call("oscar", "POST", f"/api/v1/commands/{c['command_id']}/cancel", {"reason": "x"})
        assert status == 409 and "cancelled" in body["error"]
        status, body = await api.call("oscar", "POST", "/api/v1/commands/nope/cancel", {"reason": "x"})
        assert status == 404
        assert ("oscar", "operator", "relay_close_cancelled") in await audit_actions(api, M1)
        listed = await api.ok("vera", "GET", "/api/v1/commands", query={"state": "cancelled", "meter_id": M1})
        assert [x["command_id"] for x in listed["items"]] == [c["command_id"]]


async def test_adjustments_are_idempotent_audited_and_refunds_need_an_admin(store_url, broker, tmp_path):
    async with LiveApi(store_url, broker, tmp_path) as api:
        path = "/api/v1/accounts/A0/adjustments"
        status, _ = await api.call("olga", "POST", path, {"adjustment_id": "adj-1", "amount_fen": 500, "reason": "x"})
        assert status == 403
        first = await api.ok("sam", "POST", path, {"adjustment_id": "adj-1", "amount_fen": 500, "reason": "goodwill"})
        again = await api.ok("sam", "POST", path, {"adjustment_id": "adj-1", "amount_fen": 500, "reason": "goodwill"})
        assert (first["duplicate"], again["duplicate"]) == (False, True)
        assert first["balance_fen"] == again["balance_fen"] == 10_500
        status, body = await api.call("sam", "POST", path, {"adjustment_id": "adj-1", "amount_fen": 900, "reason": "x"})
        assert status == 409 and "adj-1" in body["error"]
        status, body = await api.call("sam", "POST", path, {"adjustment_id": "r-1", "amount_fen": -200, "reason": "x"})
        assert status == 403 and "admin" in body["error"]
        refund = await api.ok("ada", "POST", path, {"adjustment_id": "r-1", "amount_fen": -200, "reason": "overpaid"})
        assert refund["kind"] == "refund" and refund["balance_fen"] == 10_300
        assert await audit_actions(api, "A0") == [("sam", "supervisor", "adjustment"), ("ada", "admin", "refund")]
        st = await api.ok("vera", "GET", "/api/v1/accounts/A0/statement")
        assert st["balance_fen"] == 10_300 and {e["entry_id"] for e in st["entries"]} >= {"adj-1", "r-1"}
        acct = await api.ok("vera", "GET", "/api/v1/accounts/A0")
        assert acct["balance_fen"] == 10_300 and acct["meters"] == [M1] and "contacts" not in acct


async def test_area_flags_are_set_with_the_setters_role(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        body = {"area": "north", "flag": "typhoon", "active": True, "reason": "signal no. 8"}
        status, _ = await api.call("olga", "POST", "/api/v1/area-flags", body)
        assert status == 403
        flag = await api.ok("sam", "POST", "/api/v1/area-flags", body)
        assert (flag["area"], flag["flag"], flag["active"], flag["actor"]) == ("north", "typhoon", True, "sam")
        flags = await api.ok("vera", "GET", "/api/v1/area-flags")
        assert [(f["area"], f["flag"], f["active"]) for f in flags["items"]] == [("north", "typhoon", True)]
        assert await audit_actions(api, "north") == [("sam", "supervisor", "area_flag_set")]
        # a misspelt area protects no one: refused, naming the field, and nothing recorded
        status, body = await api.call("sam", "POST", "/api/v1/area-flags", {**body, "area": "nroth"})
        assert status == 404 and "unknown area 'nroth'" in body["error"] and body["errors"][0]["field"] == "body.area"
        assert await audit_actions(api, "nroth") == []


async def test_a_meter_read_on_demand_is_committed_and_shown(broker, tmp_path, monkeypatch):
    monkeypatch.setattr(api_module, "BAND_SCAN", 1)  # a band is looked for in slices: one meter per slice here
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        status, _ = await api.call("vera", "POST", f"/api/v1/meters/{M1}/read")
        assert status == 403
        r = await api.ok("olga", "POST", f"/api/v1/meters/{M1}/read")
        assert r["answered"] and r["values"]["status_word_3"] and "forward_active_energy_block" in r["values"]
        shown = await api.ok("vera", "GET", f"/api/v1/meters/{M1}")
        # the newest reading shown is this one (the gateway's first poll, at start, may have one a second before)
        ts = [x["t"] for x in shown["last_readings"]]
        assert ts[0] == r["t"] and all(t < r["t"] for t in ts[1:]) and len(ts) <= 2, ts
        assert int(datetime.fromisoformat(r["taken_at"]).timestamp()) == r["t"]
        assert shown["account"]["account_id"] == "A0" and shown["account"]["balance_fen"] == 10_000
        # (a closed relay seen for the first time is no change from what the engine assumes: no row yet)
        page = await api.ok("vera", "GET", "/api/v1/meters", query={"state": "unknown", "limit": 1})
        assert [m["meter_id"] for m in page["items"]] == [M1] and page["next_offset"] == 1
        page = await api.ok("vera", "GET", "/api/v1/meters", query={"state": "unknown", "offset": 1})
        assert [m["meter_id"] for m in page["items"]] == [M2] and page["next_offset"] is None
        page = await api.ok("vera", "GET", "/api/v1/meters", query={"band": "trip"})
        assert page["items"] == []
        page = await api.ok("vera", "GET", "/api/v1/meters", query={"band": "normal", "limit": 1})
        assert [m["meter_id"] for m in page["items"]] == [M1] and page["next_offset"] == 1
        page = await api.ok("vera", "GET", "/api/v1/meters", query={"band": "normal", "offset": 1})
        assert [m["meter_id"] for m in page["items"]] == [M2] and page["next_offset"] is None
        status, body = await api.call("olga", "POST", "/api/v1/meters/NOPE/read")
        assert status == 404 and "NOPE" in body["error"]


async def test_health_and_readiness(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        assert await api.ok(None, "GET", "/health") == {"status": "ok"}
        assert await api.ok(None, "GET", "/api/v1/health") == {"status": "ok"}  # the Dockerfile's probe
        await api.live.until(lambda: api.live.bridge.stats.connected, 10)
        ready = await api.ok(None, "GET", "/ready")
        assert ready == {"ready": True, "checks": {"store": "ok", "bridge": "ok", "channels": "ok"}}
        api.live.broker.stop()
        await api.live.until(lambda: not api.live.bridge.stats.connected, 20, "the bridge notices")
        status, body = await api.call(None, "GET", "/ready")
        assert status == 503 and body["checks"]["bridge"] != "ok"


BAD = [  # who, method, path, body (or query), status, the field named
    (None, "GET", "/api/v1/meters", None, 401, None),
    ("vera", "POST", f"/api/v1/meters/{M1}/close", {"reason": "x"}, 403, None),
    ("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "   "}, 422, "body.reason"),
    ("olga", "POST", f"/api/v1/meters/{M1}/close", {}, 422, "body.reason"),
    ("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "x", "mode": "sideways"}, 422, "body.mode"),
    ("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "x", "colour": "red"}, 422, "body.colour"),
    ("olga", "POST", f"/api/v1/meters/{M1}/close", b"{not json", 422, "body.1"),
    ("olga", "POST", "/api/v1/meters/NOPE/close", {"reason": "x"}, 404, "path.meter_id"),
    ("sam", "POST", "/api/v1/accounts/A0/adjustments", {"adjustment_id": "a", "amount_fen": 1.5, "reason": "x"},
     422, "body.amount_fen"),
    ("sam", "POST", "/api/v1/accounts/A0/adjustments", {"adjustment_id": "a", "amount_fen": 0, "reason": "x"},
     422, "body.amount_fen"),
    ("sam", "POST", "/api/v1/accounts/NOPE/adjustments", {"adjustment_id": "a", "amount_fen": 5, "reason": "x"},
     404, "path.account_id"),
    ("vera", "GET", "/api/v1/meters", {"limit": 0}, 422, "query.limit"),
    ("vera", "GET", "/api/v1/commands/nope", None, 404, "path.command_id"),
    ("vera", "GET", "/api/v1/orders/nope", None, 404, "path.order_id"),
    ("vera", "GET", "/api/v1/requests/nope", None, 404, "path.request_id"),
    ("vera", "GET", "/api/v1/audit", None, 403, None),
    ("olga", "DELETE", f"/api/v1/meters/{M1}", None, 405, None),
    ("olga", "GET", "/api/v1/nothing-here", None, 404, None),
    # a NUL reached PostgreSQL (a 500) before the API refused control characters
    ("olga", "POST", f"/api/v1/meters/{M1}/disconnect", {"reason": "a\u0000b"}, 422, "body.reason"),
    ("sam", "GET", "/api/v1/audit", {"subject": "a\u0000b"}, 422, "query.subject"),
    ("vera", "GET", "/api/v1/commands", {"meter_id": "a\u0000b"}, 422, "query.meter_id"),
    ("vera", "GET", "/api/v1/meters/a%00b", None, 422, "path.meter_id"),
    # a key whose request id could not be addressed for approval
    ("olga", "POST", f"/api/v1/meters/{M1}/disconnect", {"reason": "x", "key": "a/b"}, 422, "body.key"),
    ("olga", "POST", f"/api/v1/meters/{M1}/disconnect", {"reason": "x", "key": "k" * 125}, 422, "body.key"),
]


async def test_bad_input_gets_a_4xx_that_says_what_and_where(store_url, broker, tmp_path):
    async with LiveApi(store_url, broker, tmp_path) as api:
        for who, method, path, body, status, field in BAD:
            query = body if method == "GET" else None
            got, data = await api.call(who, method, path, None if method == "GET" else body, query)
            assert got == status, (path, body, data)
            assert isinstance(data["error"], str) and data["error"], data
            if field:
                assert field in [e["field"] for e in data.get("errors", [])], (path, body, data)
        assert not await api.gw.writer.call(api.gw.control.store.meter_commands, M1)  # none of it made anything


async def test_a_body_too_large_is_refused_before_it_is_read(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(f"POST /api/v1/disconnect-plans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{api.token['olga']}\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n"
                     f"\r\n[".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # answered without the 3 MB
        assert head.startswith(b"HTTP/1.1 413")
        writer.close()
        # a chunked body has no size to check before reading it: refused as such
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(f"POST /api/v1/disconnect-plans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{api.token['olga']}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     f"\r\n100000\r\n[".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 411")
        writer.close()


async def test_secrets_never_appear_in_logs_responses_or_the_audit_log(broker, tmp_path, caplog):
    """Tokens (even one pasted into a field or a URL), the meters' relay password and the operator code."""
    caplog.set_level(logging.DEBUG)
    password, operator = "9A7C3E", "73914682"
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path, password=password,
                       operator=operator) as api:
        secret = api.token["olga"]
        req = await api.ok("olga", "POST", f"/api/v1/meters/{M1}/disconnect", {"reason": "tampering"})
        await api.ok("sam", "POST", f"/api/v1/requests/{req['request_id']}/approve", {"reason": "ok"})
        await api.live.until(lambda: api.sims[0].relay_open, 20, "tripped with the password")
        await api.ok("olga", "POST", f"/api/v1/meters/{M1}/read")
        await api.ok("vera", "GET", f"/api/v1/meters/{M1}")
        await api.ok("vera", "GET", "/api/v1/commands")
        await api.ok("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "customer called"})
        await api.call("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": "x", "token": secret})  # by mistake
        await api.call("olga", "POST", f"/api/v1/meters/{M1}/close", {"reason": 5, "password": secret})
        await api.call("olga", "GET", f"/api/v1/meters/{secret}")
        await api.call(None, "GET", "/api/v1/meters", query={"token": secret})
        await api.ok("olga", "POST", f"/api/v1/meters/{M2}/disconnect", {"reason": "tampering"})
        await api.ok("vera", "GET", "/api/v1/whoami")
        await api.ok("sam", "GET", "/api/v1/audit")
        audit = await api.gw.writer.call(api.gw.control.store.audit_log)
    logs = caplog.text
    assert "GET /api/v1/whoami" in logs  # the access log was captured
    for secret in [*api.token.values(), password, operator]:
        assert secret not in logs
        assert not any(secret in r for r in api.responses)
        assert secret not in repr(audit)


async def test_the_api_as_the_services_ops_component(broker, tmp_path):
    """What ``feikong run`` starts beside the gateway for ``[http]`` (the service's start/stop seam)."""
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        http = SimpleNamespace(host="127.0.0.1", port=0, tokens_file=str(api.tokens_path))
        service = SimpleNamespace(config=SimpleNamespace(http=http), gateway=api.gw, bridge=api.live.bridge)
        component = ApiComponent()
        await component.start(service)
        try:
            other = ApiClient(f"http://127.0.0.1:{component.port}", api.token["vera"])
            who = await asyncio.to_thread(other.call, "GET", "/api/v1/whoami")
            assert who["name"] == "vera" and who["role"] == "viewer"
        finally:
            await component.stop()
        # without a tokens file: the probes answer, every operator call is refused
        http = SimpleNamespace(host="127.0.0.1", port=0, tokens_file="")
        bare = ApiComponent()
        await bare.start(SimpleNamespace(config=SimpleNamespace(http=http), gateway=api.gw, bridge=None))
        try:
            client = ApiClient(f"http://127.0.0.1:{bare.port}", api.token["ada"])
            assert (await asyncio.to_thread(client.request, "GET", "/api/v1/health"))[0] == 200
            assert (await asyncio.to_thread(client.request, "GET", "/api/v1/whoami"))[0] == 401
        finally:
            await bare.stop()
