"""The operator API served for real (uvicorn on a free port) over a live gateway (LiveGateway: simulated DL/T 645
meters over TCP, the MQTT bridge on a real Mosquitto), with a token for each role."""
from __future__ import annotations

import asyncio

from gateway.core.model import Payment
from gateway.ops.api import ApiServer, create_app
from gateway.ops.auth import Tokens
from gateway.ops.console import ApiClient
from simulators.dlt645 import SimMeter

from .mqtt_fixtures import LiveGateway

#: who holds a token, and in which role
PEOPLE = {"vera": "viewer", "olga": "operator", "oscar": "operator", "sam": "supervisor", "sue": "supervisor",
          "ada": "admin"}


def meter_address(i: int) -> str:
    return f"{i + 1:012d}"


class LiveApi:
    """``meters`` simulated meters (relays closed), one per funded account (100 yuan each)."""

    def __init__(self, store_url: str, broker, tmp_path, *, meters: int = 2, request_ttl_s: float = 24 * 3600,
                 password: str = "000000", operator: str = "00000000") -> None:
        """``password``, ``operator``: the meters' relay password and the operator code the bus sends."""
        self.sims = [SimMeter(meter_address(i), password=password) for i in range(meters)]
        self.live = LiveGateway(store_url, broker, accounts=meters, meters=self.sims,
                                bus={"password": password, "operator": operator})
        self.tokens_path = tmp_path / "tokens.toml"
        self.request_ttl_s = request_ttl_s
        self.responses: list[str] = []  # every response body, for the tests that look for leaked secrets

    async def __aenter__(self) -> "LiveApi":
        await self.live.__aenter__()
        self.gw = self.live.gw
        await self.gw.credits([Payment(f"fund-{a}", a, 10_000, int(self.gw.clock.now()))
                               for a in self.gw.control.engine.account_ids])
        tokens = Tokens({}, self.tokens_path)
        self.token = {name: tokens.add(name, role) for name, role in PEOPLE.items()}
        app = create_app(self.gw, Tokens.load(self.tokens_path), bridge=self.live.bridge,
                         request_ttl_s=self.request_ttl_s)
        self.server = ApiServer(app)
        self.port = await self.server.start()
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        await self.live.__aexit__(*exc)

    def client(self, who: str | None) -> ApiClient:
        return ApiClient(self.base, self.token[who] if who else None)

    async def call(self, who: str | None, method: str, path: str, body=None, query=None) -> tuple[int, object]:
        """``(status, body)`` of one request as ``who`` (None: no token), made from a thread: the server runs
        on this loop."""
        status, data = await asyncio.to_thread(self.client(who).request, method, path, body, query)
        self.responses.append(repr(data))
        return status, data

    async def ok(self, who: str | None, method: str, path: str, body=None, query=None):
        status, data = await self.call(who, method, path, body, query)
        assert status < 300, (status, data)
        return data
