"""The operator console end to end: ``feikong`` commands against the real API server over a live gateway."""
import asyncio
import re

from gateway import cli
from gateway.ops.auth import Tokens

from .api_fixtures import LiveApi, meter_address

M1 = meter_address(0)


class Console:
    def __init__(self, api: LiveApi, capsys, tmp_path) -> None:
        self.api, self.capsys, self.tmp_path = api, capsys, tmp_path

    async def run(self, who: str | None, *argv: str) -> tuple[int, str, str]:
        """``feikong ARGV...`` as ``who`` (in a thread: the API serves on this loop): exit code, out, err."""
        extra = []
        if who is not None:
            f = self.tmp_path / f"{who}.token"
            f.write_text(self.api.token[who] + "\n")
            extra = ["--api", self.api.base, "--token-file", str(f)]
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, *extra])
        out, err = self.capsys.readouterr()
        return code, out, err


async def test_an_operator_and_a_supervisor_disconnect_a_meter_from_the_console(broker, tmp_path, capsys):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        con = Console(api, capsys, tmp_path)
        code, out, _ = await con.run("olga", "relay", "trip", M1, "--reason", "tampering found")
        assert code == 0 and "awaits approval by a supervisor other than olga" in out
        rid = re.search(r"request (\S+):", out).group(1)
        code, out, _ = await con.run("vera", "requests", "--state", "pending")
        assert code == 0 and rid in out and "tampering found" in out
        code, out, err = await con.run("olga", "relay", "approve", rid, "--reason", "me")
        assert code == 1 and out == "" and err.count("\n") == 1 and "403" in err and "supervisor" in err
        code, out, _ = await con.run("sue", "relay", "approve", rid, "--reason", "photos seen")
        assert code == 0 and f"request {rid} approved by sue" in out and "trip command manual:" in out
        await api.live.until(lambda: api.sims[0].relay_open, 20, "tripped")
        await api.live.until(lambda: any(c.state.value == "confirmed" for c in api.gw.control.controller.commands.values()),
                             20, "confirmed")
        code, out, _ = await con.run("vera", "meter", "why", M1)
        assert code == 0 and "relay open" in out and "olga (approved by sue)" in out
        code, out, _ = await con.run("vera", "meter", "show", M1)
        assert code == 0 and "account A0" in out and "balance 100.00 yuan" in out and "relay commands" in out
        code, out, _ = await con.run("olga", "meter", "read", M1)
        assert code == 0 and "forward_active_energy_block" in out and "status_word_3" in out
        code, out, _ = await con.run("olga", "relay", "close", M1, "--reason", "works finished")
        assert code == 0 and "close command manual:" in out
        await api.live.until(lambda: not api.sims[0].relay_open, 20, "closed again")
        code, out, _ = await con.run("vera", "orders")
        assert code == 0 and "field orders" in out
        code, out, _ = await con.run("vera", "meters", "--limit", "1")
        assert code == 0 and M1 in out and meter_address(1) not in out and "more: --offset 1" in out


async def test_console_errors_are_one_line_with_the_exit_code(broker, tmp_path, capsys, monkeypatch):
    async with LiveApi(f"sqlite://{tmp_path / 'g.db'}", broker, tmp_path) as api:
        con = Console(api, capsys, tmp_path)
        code, _, err = await con.run("olga", "relay", "cancel", "nope", "--reason", "x")
        assert code == 1 and "404" in err and "unknown command 'nope'" in err and err.count("\n") == 1
        code, _, err = await con.run("vera", "relay", "close", M1, "--reason", "x")
        assert code == 1 and "403" in err
        code, _, err = await con.run("olga", "relay", "close", M1, "--reason", " ")
        assert code == 1 and "422" in err and "body.reason" in err
        # the token from the environment, the API from the environment; then an API that is not there
        monkeypatch.setenv("FEIKONG_TOKEN", api.token["vera"])
        monkeypatch.setenv("FEIKONG_API", api.base)
        code, out, _ = await con.run(None, "meter", "why", M1)
        assert code == 0 and f"meter {M1}" in out
        monkeypatch.setenv("FEIKONG_API", "http://127.0.0.1:9")
        code, _, err = await con.run(None, "orders")
        assert code == 2 and "cannot reach the API at http://127.0.0.1:9" in err
        monkeypatch.delenv("FEIKONG_TOKEN")
        code, _, err = await con.run(None, "orders")
        assert code == 1 and "no token" in err


def test_feikong_token_add_prints_the_token_once_and_keeps_its_hash(tmp_path, capsys):
    path = tmp_path / "tokens.toml"
    assert cli.main(["token", "add", "olga", "--role", "operator", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("fk_") and token not in path.read_text()
    assert cli.main(["token", "add", "sam", "--role", "supervisor", "--file", str(path)]) == 0
    capsys.readouterr()
    tokens = Tokens.load(path)
    assert tokens.identify(token).name == "olga" and tokens.names() == {"olga": "operator", "sam": "supervisor"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # hashes only, but nobody else's business
    assert tokens.identify(token + "x") is None
    assert cli.main(["token", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "olga" in listed and "supervisor" in listed and token not in listed
    assert cli.main(["token", "remove", "olga", "--file", str(path)]) == 0
    assert Tokens.load(path).identify(token) is None
    assert cli.main(["token", "remove", "olga", "--file", str(path)]) == 1
    assert "no token named 'olga'" in capsys.readouterr().err
    assert cli.main(["token", "add", "bad name", "--role", "viewer", "--file", str(path)]) == 1
    assert "name 'bad name'" in capsys.readouterr().err
    path.write_text('[tokens.x]\nrole = "root"\nsha256 = "00"\n')
    assert cli.main(["token", "add", "y", "--role", "viewer", "--file", str(path)]) == 1
    assert "tokens.x: role 'root'; allowed: viewer, operator, supervisor, admin" in capsys.readouterr().err


def test_a_token_added_while_the_api_runs_counts_at_once(tmp_path):
    path = tmp_path / "tokens.toml"
    tokens = Tokens({}, path)
    first = tokens.add("olga", "operator")
    live = Tokens.load(path)
    assert live.identify(first).role == "operator"
    second = Tokens.load(path).add("sam", "supervisor")  # another process (the CLI) adds one
    assert live.identify(second).name == "sam"
    Tokens.load(path).remove("olga")
    assert live.identify(first) is None


def test_a_broken_or_missing_tokens_file_refuses_every_token(tmp_path, caplog):
    path = tmp_path / "tokens.toml"
    token = Tokens({}, path).add("olga", "operator")
    live = Tokens.load(path)
    path.write_text(path.read_text() + "\n[tokens.x\n")  # an edit gone wrong
    assert live.identify(token) is None and "not valid TOML" in caplog.text
    path.unlink()
    assert live.identify(token) is None and "is gone" in caplog.text
