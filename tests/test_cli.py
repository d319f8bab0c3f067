"""The feikong command: decoder output and errors, read/relay against a simulator, sim and demo commands."""
import json
import os
import re
import subprocess
import sys

import pytest

from gateway.cli import main
from protocols.dlt645.frame import encode_frame

REQ = "FE FE FE FE 68 61 01 00 00 00 00 68 11 04 33 33 34 33 14 16"
REP = "68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_decode_several_frames_pasted_with_spaces(capsys):
    code, objs, _ = run(capsys, "dlt645", "decode", REQ, REP)
    assert code == 0
    assert [o["message"] for o in objs] == ["ReadRequest", "ReadReply"]
    reply = objs[1]
    assert reply["address"] == "000000000161" and reply["direction"] == "meter_to_master"
    assert (reply["di"], reply["value"], reply["unit"], reply["edition"]) == ("00010000", "0.26", "kWh", 2007)
    assert reply["control"] == "91" and reply["function"] == "read_data"


def test_decode_accepts_other_separators_and_0x(capsys):
    code, objs, _ = run(capsys, "dlt645", "decode", REP.replace(" ", ":").lower())
    assert code == 0 and objs[0]["value"] == "0.26"
    code, objs, _ = run(capsys, "dlt645", "decode", " ".join("0x" + b for b in REP.split()))
    assert code == 0 and objs[0]["value"] == "0.26"


def test_decode_abnormal_reply_names_error_words(capsys):
    wire = encode_frame("000000000001", 0xDC, b"\x04").hex()
    code, objs, _ = run(capsys, "dlt645", "decode", wire)
    assert objs[0]["abnormal"] is True and objs[0]["errors"] == ["password_error_or_unauthorized"]


@pytest.mark.parametrize("hex_text, reason, offset", [
    (REP[:-6] + " 8B 16", "bad_checksum", 18),
    (REP[:-3] + " 17", "bad_end", 19),
    (REP[:30], "truncated", 10),
    ("12 34 " + REP, "noise", 0),
    ("68 61 01 00 00 00 00 00 91 08", "bad_header", 7),
])
def test_decode_malformed_names_reason_and_byte_offset(capsys, hex_text, reason, offset):
    code, objs, _ = run(capsys, "dlt645", "decode", hex_text)
    assert code == 1
    err = next(o for o in objs if "error" in o)
    assert err["reason"] == reason and err["offset"] == offset and err["error"]


def test_decode_good_frame_after_bad_one_is_still_printed(capsys):
    code, objs, _ = run(capsys, "dlt645", "decode", REP[:-6] + " 8B 16", REP)
    assert code == 1
    assert objs[0]["reason"] == "bad_checksum" and objs[1]["value"] == "0.26"


def test_decode_bad_hex_is_one_clear_line(capsys):
    code, objs, err = run(capsys, "dlt645", "decode", "68 61 0G")
    assert code == 1 and objs == []
    assert "'G'" in err and "byte offset 2" in err
    code, _, err = run(capsys, "dlt645", "decode", "68 6")
    assert code == 1 and "odd number" in err


def test_decode_data_that_does_not_fit_function(capsys):
    code, objs, _ = run(capsys, "dlt645", "decode", encode_frame("000000000001", 0x91, b"\x00").hex())
    assert code == 1 and objs[0]["reason"] == "bad_data" and "at least 4" in objs[0]["error"]


def test_decode_reads_stdin(monkeypatch, capsys):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO(REP + "\n"))
    code, objs, _ = run(capsys, "dlt645", "decode")
    assert code == 0 and objs[0]["value"] == "0.26"


@pytest.fixture
def sim_server():
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", "dlt645", "--tcp", "127.0.0.1:0",
                             "--meters", "3", "--first-address", "000000000100"],
                            stdout=subprocess.PIPE, text=True)
    header = proc.stdout.readline()
    addresses = [proc.stdout.readline().strip() for _ in range(3)]
    port = int(re.search(r"tcp://127.0.0.1:(\d+)", header).group(1))
    yield port, addresses
    proc.terminate()
    assert proc.wait(timeout=5) == 0  # SIGTERM stops it cleanly


def test_sim_prints_addresses(sim_server):
    _, addresses = sim_server
    assert addresses == ["000000000100", "000000000101", "000000000102"]


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=30)


def test_read_and_relay_against_the_simulator(sim_server):
    port, _ = sim_server
    link = ["--tcp", f"127.0.0.1:{port}", "--addr", "101", "--baud", "9600"]
    r = cli("dlt645", "read", *link, "--di", "00010000")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["di_name"] == "forward_active_energy_total" and out["unit"] == "kWh"
    r = cli("dlt645", "read", *link, "--di", "voltage_a")
    assert json.loads(r.stdout)["value"] == "220.0"
    r = cli("dlt645", "relay", *link, "trip")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["relay"] == "open"
    r = cli("dlt645", "relay", *link, "close")
    assert json.loads(r.stdout)["relay"] == "closed"


def test_read_errors_are_clear(sim_server):
    port, _ = sim_server
    r = cli("dlt645", "read", "--tcp", f"127.0.0.1:{port}", "--addr", "999", "--baud", "9600",
            "--timeout", "0.2", "--retries", "0", "--di", "00010000")
    assert r.returncode == 2 and "no reply from 000000000999" in r.stdout
    r = cli("dlt645", "read", "--tcp", f"127.0.0.1:{port}", "--addr", "10X", "--di", "00010000")
    assert r.returncode == 1 and "address" in r.stderr
    r = cli("dlt645", "read", "--tcp", f"127.0.0.1:{port}", "--addr", "101", "--di", "nonsense")
    assert r.returncode == 1 and "not a known data-item name" in r.stderr
    r = cli("dlt645", "relay", "--tcp", f"127.0.0.1:{port}", "--addr", "101", "explode")
    assert r.returncode == 1 and "allowed: trip" in r.stderr
    r = cli("dlt645", "read", "--tcp", "127.0.0.1:1", "--addr", "101", "--di", "00010000")
    assert r.returncode == 2 and "cannot open tcp://127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_sim_on_a_pty_prints_its_path():
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", "dlt645", "--pty", "--meters", "2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        header = proc.stdout.readline()
        path = re.search(r"pty (/dev/\S+)", header).group(1)
        assert os.path.exists(path)
        r = cli("dlt645", "read", "--serial", path, "--parity", "N", "--baud", "9600", "--addr", "2",
                "--di", "04000401")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["value"] == "000000000002"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_demo_runs_the_gateway_on_every_kind_of_channel_and_prints_a_summary_block():
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--cycles", "3", "--interval", "2",
                        "--tcp-meters", "4", "--pty-meters", "2", "--modbus-meters", "2", "--concentrator-meters", "2",
                        "--json-meters", "2", "--per-line", "2", "--stuck-relay", "0", "--silent-after-trip", "0",
                        "--transient", "0"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "feikong demo: 12 simulated meters on 6 channels:"
    kinds = ("tcp://", "serial:///dev/pts/", "modbus+tcp://", "mqtt://c1", "mqtt://j1")
    assert all(any(line.strip().startswith(k) for line in lines[1:7]) for k in kinds), lines[:7]
    assert re.match(r"broker +mqtt://127\.0\.0\.1:\d+$", lines[7]) and lines[8].startswith("store    sqlite:///")
    assert any("dead letter: invalid Payment: Expected `str`, got `float` - at `$.amount`" in line for line in lines)
    blocks = [i for i, line in enumerate(lines) if line.startswith("-- ")]
    assert len(blocks) == 3
    last = "\n".join(lines[blocks[-1]:blocks[-1] + 7])
    for pattern in (r"meters    12: \d+ online, \d+ tripped, \d+ unreachable", r"reads     \d+/s; last full cycle: ",
                    r"notices   \d+ requested, \d+ confirmed, \d+ escalated",
                    r"relays    \d+ trips verified, \d+ payments, \d+ closes verified \(payment to verified close: ",
                    r"field     \d+ orders: \d+ open, \d+ overdue, \d+ completed", r"dead letters 1"):
        assert re.search(pattern, last), (pattern, last)
    assert re.search(r"meters    12: 12 online", last), last  # every meter on every kind of channel answers
    assert lines[-1] == "feikong demo stopped."


def test_demo_help_is_true_to_the_options():
    r = cli("demo", "--help")
    assert r.returncode == 0
    for option in ("--tcp-meters", "--pty-meters", "--modbus-meters", "--concentrator-meters", "--json-meters",
                   "--per-line", "--stuck-relay", "--silent-after-trip", "--transient", "--seed", "--control",
                   "--cycles", "--interval", "--poll"):
        assert option in r.stdout
    assert "(default: 600)" in r.stdout and "gateway/demo.control.toml" in r.stdout
    r = cli("demo", "--stuck-relay", "2")
    assert r.returncode == 1 and "stuck_relay must be a share between 0 and 1" in r.stderr


def test_help_lists_the_commands():
    r = cli("--help")
    for word in ("demo", "dlt645", "sim"):
        assert word in r.stdout
    r = cli("dlt645", "decode", "--help")
    assert "FE preambles" in r.stdout
