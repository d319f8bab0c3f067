"""Schemathesis over the operator API's own OpenAPI description, against the real server on a live gateway:
malformed calls (negative data) change nothing in the store, and no call of any role gets a 500.

Bounded: a few examples per operation and mode (about 20 s on two busy cores)."""
import asyncio

import hypothesis.strategies as st
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .api_fixtures import PEOPLE, LiveApi, meter_address

M1 = meter_address(0)

EXAMPLES = 10  # per operation and mode
ROLE_HOLDERS = ["vera", "olga", "sam", "ada"]  # one of each role
assert sorted({PEOPLE[p] for p in ROLE_HOLDERS}) == ["admin", "operator", "supervisor", "viewer"]
NO_INPUT = {"GET /health", "GET /ready", "GET /api/v1/health", "GET /api/v1/ready", "GET /api/v1/whoami",
            "GET /api/v1/area-flags", "GET /api/v1/audit/verify"}  # nothing to malform


def fingerprint(store) -> dict:
    """What a malformed call must not change: money, the audit chain, commands, requests, area flags."""
    one = lambda sql: store._query(sql)[0]  # noqa: E731
    return {
        "ledger": one("SELECT COUNT(*), COALESCE(SUM(amount_fen), 0) FROM ledger"),
        "audit": store.audit_head(),
        "commands": one("SELECT COUNT(*), COALESCE(MAX(updated_at), 0) FROM relay_commands"),
        "requests": one("SELECT COUNT(*), COUNT(decided_at) FROM approval_requests"),
        "flags": store._query("SELECT area, flag, active, since, actor, reason FROM area_flags ORDER BY area, flag"),
        "readings": one("SELECT COUNT(*) FROM readings"),
    }


def run_fuzz(api: LiveApi, loop, mode: GenerationMode, seen: dict, known: dict | None = None) -> list[str]:
    """``known``: path parameters fixed to things that exist (the meter, the account), so that well-formed
    calls reach the handlers' real work instead of a 404."""
    schema = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    problems: list[str] = []
    store = api.gw.control.store

    def print_of() -> dict:
        return asyncio.run_coroutine_threadsafe(api.gw.writer.call(fingerprint, store), loop).result(30)

    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    for op in operations:
        fixed = {k: v for k, v in (known or {}).items() if "{" + k + "}" in op.path}
        if known and not fixed:
            continue

        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed or None),
               who=st.sampled_from(ROLE_HOLDERS))
        def check(case, who):
            # what was made to not fit (the Authorization header is ours to set: a case that malformed only
            # headers is sent with a valid token and proper headers, so it is no malformed call)
            broken = sorted(loc.name for loc, info in (case.meta.components.items() if case.meta else ())
                            if info.mode.is_negative)
            before = print_of() if mode == GenerationMode.NEGATIVE and set(broken) - {"HEADER"} else None
            response = case.call(base_url=api.base, headers={"Authorization": f"Bearer {api.token[who]}"},
                                 timeout=30)
            label = f"{op.label} as {who} (malformed: {', '.join(broken) or '-'}): {case.as_curl_command()}"
            if response.status_code >= 500 and not (op.path == "/ready" and response.status_code == 503):
                problems.append(f"{response.status_code} from {label}: {response.text[:300]}")
            seen[response.status_code // 100] = seen.get(response.status_code // 100, 0) + 1
            if before is not None:
                seen["compared"] = seen.get("compared", 0) + 1
                after = print_of()
                if after != before:
                    problems.append(f"a malformed call changed the store: {label}: {before} -> {after}")
            content_type = response.headers.get("content-type") or [""]
            if not str(content_type[0] if isinstance(content_type, list) else content_type).startswith(
                    "application/json"):
                problems.append(f"not JSON ({content_type}): {label}")

        try:
            check()
        except Unsatisfiable:  # nothing to malform: no parameters, no body
            assert mode == GenerationMode.NEGATIVE and op.label in NO_INPUT, op.label
    return problems


async def test_no_malformed_call_changes_anything_and_no_call_gets_a_500(broker, tmp_path):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        loop = asyncio.get_running_loop()
        neg: dict = {}
        negative = await asyncio.to_thread(run_fuzz, api, loop, GenerationMode.NEGATIVE, neg)
        assert not negative, "\n".join(negative[:10])
        assert neg.get("compared", 0) >= 50, neg  # the store was compared around malformed calls (~100 a run)
        pos: dict = {}
        positive = await asyncio.to_thread(run_fuzz, api, loop, GenerationMode.POSITIVE, pos)
        assert not positive, "\n".join(positive[:10])
        assert pos.get(2, 0) >= 50, pos  # and well-formed calls got through
        real: dict = {}
        on_real = await asyncio.to_thread(run_fuzz, api, loop, GenerationMode.POSITIVE, real,
                                          {"meter_id": M1, "account_id": "A0"})
        assert not on_real, "\n".join(on_real[:10])
        assert real.get(2, 0) >= 20, real
