"""The service's config file, the fleet file and `feikong config check`: the examples pass, every wrong value
is reported (all of them, not the first) with the file, the key or line:column, and the allowed values."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import (CHANNEL_KINDS, ConfigErrors, FleetSettings, GatewaySettings, HttpSettings,
                            MetricsSettings, ServiceConfig, StoreSettings, check_service_config, load_service_config)
from gateway.core.config import build
from gateway.core.control import ControlConfig
from gateway.core.model import CustomerClass
from gateway.core.thresholds import ThresholdPolicy
from gateway.fleet import COLUMNS
from gateway.northbound.mqtt import BrokerConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "gateway.example.toml"
TARIFFS = ROOT / "config" / "tariffs.example.json"


def test_the_example_sets_every_table_at_its_default_and_shows_every_key():
    raw = tomllib.loads(EXAMPLE.read_text())
    for table, cls in (("store", StoreSettings), ("gateway", GatewaySettings), ("thresholds", ThresholdPolicy),
                       ("http", HttpSettings), ("metrics", MetricsSettings), ("mqtt", BrokerConfig)):
        assert build(cls, raw[table], table) == cls(), table
        assert set(raw[table]) == {f.name for f in dataclasses.fields(cls)}, table
    assert raw["control"] == {"file": ""}
    # a channel of every kind, each with every setting it has
    shown = {}
    for item in raw["channels"]:
        shown.setdefault(item["kind"], set()).update(item)
    for kind, cls in CHANNEL_KINDS.items():
        assert shown.get(kind, set()) >= {f.name for f in dataclasses.fields(cls)}, kind
    header = (ROOT / "config" / "fleet.example.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS


def test_the_example_passes_with_its_fleet_on_every_kind_of_channel():
    config = load_service_config(EXAMPLE)
    assert config.policies == ControlConfig() and config.thresholds == ThresholdPolicy()
    assert {c.kind for c in config.channels} == set(CHANNEL_KINDS)
    assert set(config.tariffs) == {"flat", "tou", "tiered"}
    assert len(config.accounts) == 8 and len(config.meters) == 8
    by_id = {a.account_id: a for a in config.accounts}
    a = by_id["A0003"]
    assert (a.customer_class, a.tariff_id, a.lat, a.overdraft_limit_fen) == (CustomerClass.COMMERCIAL, "tiered",
                                                                              30.5931, 5000)
    assert a.channels == ("sms", "email") and a.contacts["email"] == "wang@example.cn"
    assert [m.meter_id for m in config.meters if m.account_id == "A0004"] == ["000000000201", "000000000202"]
    assert config.devices == {"PLANT-M1": 1, "RTU-7": 7}
    assert {m.channel for m in config.meters} == {c.name for c in config.channels}
    assert by_id["A0008"].name.startswith("Zhou") and not [m for m in config.meters if m.account_id == "A0008"]
    # relative paths are the config file's directory
    assert config.fleet == FleetSettings(str(ROOT / "config" / "fleet.example.csv"), str(TARIFFS))
    assert config.store.url == f"sqlite://{ROOT / 'config' / 'feikong.db'}"


def test_defaults_without_a_file_of_settings(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("")
    config = load_service_config(path)
    assert config == ServiceConfig(store=StoreSettings(f"sqlite://{tmp_path / 'feikong.db'}"))


BAD = """
colour = "red"
[store]
url = "mysql://db"
[http]
port = 70000
[metrics]
host = ""
[mqtt]
port = "1883x"
[gateway]
poll_interval_s = "often"
[thresholds]
warn1_days = 0
[control]
file = "missing-control.toml"
[fleet]
tariffs = "{tariffs}"
file = "fleet.csv"
[[channels]]
kind = "dlt645_tcp"
name = "tcp-1"
host = "10.0.0.1"
port = 6001
edition = 2008
[[channels]]
kind = "dlt645_serial"
name = "rs485"
parity = "X"
baud = "fast"
stopbits = 3
[[channels]]
kind = "modbus_rtu"
name = "tcp-1"
device = "/dev/ttyUSB1"
profile = "no_such_meter"
[[channels]]
kind = "zigbee"
name = "z"
[[channels]]
kind = "concentrator"
name = "c"
id = "c1"
mode = "xml"
colour = "red"
"""


def test_every_error_is_reported_with_its_key_and_the_allowed_values(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(BAD.format(tariffs=TARIFFS))
    (tmp_path / "fleet.csv").write_text("account_id,tariff,meter_id,channel\nA1,flat,1,tcp-1\n")
    config, errors = check_service_config(path)
    assert config is None
    expected = [
        "colour: unknown table; allowed: store, control, mqtt, http, metrics, gateway, thresholds, fleet, cluster, "
        "channels",
        "store: url 'mysql://db': allowed: sqlite://PATH, postgresql://USER@HOST/DB",
        "http: port 70000 is not a TCP port; allowed: 1..65535",
        "metrics: host must not be empty",
        "mqtt.port: expected a number, got '1883x'",
        "gateway.poll_interval_s: 'often' is not a duration",
        "thresholds: thresholds.warn1_days must be positive, got 0",
        "control.file: " + str(tmp_path / "missing-control.toml") + ": no such file",
        "channels[0].edition: 2008 (int) is not allowed; allowed: 2007, 1997",
        "channels[1].device: required for kind 'dlt645_serial'",
        "channels[1].parity: 'X' (str) is not allowed; allowed: E, N, O",
        "channels[1].baud: expected a number, got 'fast'",
        "channels[1].stopbits: 3 (int) is not allowed; allowed: 1, 2",
        "channels[2].name: 'tcp-1' is also channels[0]'s; channel names must be unique",
        "channels[2].profile: no shipped Modbus profile 'no_such_meter'; shipped: ['chint_ddsu666', 'hiking_dds238_2_znsr']",
        "channels[3].kind: 'zigbee'; allowed: dlt645_tcp, dlt645_serial, modbus_tcp, modbus_rtu, concentrator",
        "channels[4].colour: unknown setting; allowed here: name, id, kind, mode,",
        "channels[4].mode: 'xml' (str) is not allowed; allowed: frame, json",
    ]
    for text in expected:
        found = [e for e in errors if text in e]
        assert found, f"{text!r} not among:\n" + "\n".join(errors)
        assert all(e.startswith(f"{path}: ") for e in found)
    assert len(errors) == len(expected), "\n".join(errors)


def test_config_check_prints_every_error_and_exits_1(tmp_path, capsys):
    path = tmp_path / "gw.toml"
    path.write_text('[store]\nurl = "mysql://db"\n[[channels]]\nkind = "dlt645_serial"\nname = "a"\n'
                    'device = "/dev/ttyS0"\nparity = "e"\n')
    assert main(["config", "check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"error: {path}: store: url 'mysql://db': allowed: sqlite://PATH, postgresql://USER@HOST/DB",
                   f"error: {path}: channels[0].parity: 'e' (str) is not allowed; allowed: E, N, O",
                   "2 errors"]


@pytest.mark.parametrize("path", [EXAMPLE, ROOT / "deploy" / "gateway.toml"])
def test_config_check_passes_the_examples_with_a_summary(path, capsys):
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    config = load_service_config(path)
    assert f"ok: {path}: {len(config.channels)} channels" in out
    assert f"{len(config.accounts):,} accounts, {len(config.meters):,} meters, 3 tariffs" in out
    for c in config.channels:  # the table of channels
        assert c.name in out


def test_an_edition_the_poller_cannot_read_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('[[channels]]\nkind = "dlt645_tcp"\nname = "old"\nhost = "h"\nport = 1\nedition = 1997\n')
    config, errors = check_service_config(path)
    assert errors == [f"{path}: channels[0]: edition 1997: the gateway reads forward_active_energy_block, voltage_a, "
                      f"remaining_amount, status_word_3 from every meter and DL/T 645-1997 has no remaining_amount, "
                      f"status_word_3 (the relay's read-back); allowed: 2007"]


def test_feikong_run_refuses_a_wrong_config_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "gw.toml"
    path.write_text('[store]\nurl = "sqlite://state.db"\n[gateway]\ntick_s = 0\n')
    assert main(["run", "--config", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"error: {path}: gateway: tick_s must be positive, got 0.0",
                                                    "1 error"]
    assert not (tmp_path / "state.db").exists()


def test_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigErrors, match="cannot read"):
        load_service_config(tmp_path / "nope.toml")
    (tmp_path / "gw.toml").write_text("[store\n")
    with pytest.raises(ConfigErrors, match="not valid TOML"):
        load_service_config(tmp_path / "gw.toml")


# ---------------------------------------------------------------- the fleet file

CHANNELS = f"""
[fleet]
file = "fleet.csv"
tariffs = "{TARIFFS}"
[[channels]]
kind = "dlt645_tcp"
name = "tcp-1"
host = "h"
port = 1
[[channels]]
kind = "modbus_tcp"
name = "mb"
host = "h"
"""


def fleet_errors(tmp_path, text: str) -> list[str]:
    (tmp_path / "gw.toml").write_text(CHANNELS)
    (tmp_path / "fleet.csv").write_text(text)
    config, errors = check_service_config(tmp_path / "gw.toml")
    assert (config is None) == bool(errors)
    prefix = f"{tmp_path / 'fleet.csv'}:"
    assert all(e.startswith(prefix) for e in errors), errors
    return [e.removeprefix(prefix) for e in errors]


def test_fleet_errors_name_their_line_and_column_and_what_is_allowed(tmp_path):
    errors = fleet_errors(tmp_path, "\n".join([
        "account_id,class,tariff,lat,notice_channels,contacts,overdraft_yuan,meter_id,channel,device_id,max_kw,reconnect_mode",
        "A1,gold,flat,,,,,1,tcp-1,,,",                     # 2: class
        "A2,,cheap,,,,,2,tcp-1,,,",                        # 3: tariff
        "A3,,flat,95,pigeon;sms,fax=1,-5,3,tcp-1,,,",      # 4: lat, notice channel, contact, overdraft
        "A4,,flat,,,,,4,nowhere,,,",                       # 5: channel
        "A5,,flat,,,,,X9,tcp-1,,0,later",                  # 6: address, max_kw, reconnect mode
        "A6,,flat,,,,,M1,mb,,,",                           # 7: Modbus without device id
        "A7,,flat,,,,,M2,mb,300,,",                        # 8: device id range
        "A8,,flat,,,,,M3,mb,5,,",
        "A9,,flat,,,,,M4,mb,5,,",                          # 10: device id taken
        "A10,,flat,,,,,1,tcp-1,,,",
        "A10,vip,,,,,,5,tcp-1,,,",                         # 12: disagrees with line 11
        "A11,,flat,,,,,000000000005,tcp-1,,,",             # 13: meter already on line 12
        "A12,,flat,,,,,6,tcp-1,7,,",                       # 14: device id on a DL/T 645 channel
        "A13,,flat,,,,,,,,9,",                             # 15: meter columns without a meter
    ]) + "\n")
    expected = [
        "2:2: class: 'gold' is not allowed; allowed: residential, commercial, vip, protected",
        "3:3: tariff: 'cheap' is not in the tariffs file; allowed: flat, tiered, tou",
        "4:4: lat: 95 is outside -90..90",
        "4:5: notice_channels: 'pigeon' is not a notice channel; allowed (in order, separated by ;): app, email, paper, sms, voice",
        "4:6: contacts: 'fax' is not a notice channel; allowed: app, email, paper, sms, voice",
        "4:7: overdraft_yuan: '-5'; allowed: an amount of yuan >= 0",
        "5:9: channel: 'nowhere' is not a channel; allowed: the [[channels]] names: tcp-1, mb",
        "6:8: meter_id: 'X9':",
        "6:11: max_kw: '0'; allowed: a whole number of kW > 0",
        "6:12: reconnect_mode: 'later' is not allowed; allowed: direct, close_allowed",
        "7:10: device_id: required for a Modbus meter; allowed: 1..247",
        "8:10: device_id: '300'; allowed: 1..247",
        "10:10: device_id: 5 is meter M3's on mb (line 9)",
        "11:8: meter_id: 000000000001 is on line 2 already",
        "12:2: class: 'vip', but account A10 has '' on line 11",
        "13:8: meter_id: 000000000005 is on line 12 already",
        "14:10: device_id: set, but tcp-1 (dlt645_tcp) has no device ids",
        "15:11: max_kw: set, but the row has no meter_id",
    ]
    for text in expected:
        assert any(e.startswith(text) for e in errors), f"{text!r} not among:\n" + "\n".join(errors)
    assert len(errors) == len(expected), "\n".join(errors)


@pytest.mark.parametrize("text, message", [
    ("", "1: empty file; the first line names the columns: account_id,"),
    ("account_id,tarif\n", "1:2: unknown column 'tarif'; allowed: account_id, class,"),
    ("account_id,tariff,tariff\n", "1:3: column 'tariff' appears twice"),
    ("meter_id,channel\n", "1: the column 'account_id' is required"),
    ("account_id,tariff\nA1,flat,extra\n", "2: 3 cells; the header names 2"),
])
def test_a_broken_fleet_header_or_row(tmp_path, text, message):
    errors = fleet_errors(tmp_path, text)
    assert any(e.startswith(message) for e in errors), errors


def test_a_large_fleet_is_read_whole(tmp_path):
    rows = ["account_id,tariff,meter_id,channel"] + [f"A{i},flat,{i},tcp-1" for i in range(1, 20_001)]
    assert fleet_errors(tmp_path, "\n".join(rows) + "\n") == []
    config = load_service_config(tmp_path / "gw.toml")
    assert len(config.meters) == 20_000 and config.meters[-1].meter_id == "000000020000"
    assert len(config.meters_on("tcp-1")) == 20_000


def test_every_error_of_the_control_policies_it_names(tmp_path):
    (tmp_path / "control.toml").write_text('[trips]\nnotice_lead_s = "a day"\ndaily_cap_per_area = 2.5\n'
                                           '[trips.window]\nforbid_fridays = "yes"\n[calendar]\ncountry = "XX"\n')
    (tmp_path / "gw.toml").write_text('[control]\nfile = "control.toml"\n')
    config, errors = check_service_config(tmp_path / "gw.toml")
    control = tmp_path / "control.toml"
    assert [e.split(": ", 2)[1] for e in errors] == ["trips.notice_lead_s", "trips.daily_cap_per_area",
                                                     "trips.window.forbid_fridays", "calendar"]
    assert all(e.startswith(f"{control}: ") for e in errors)


def test_feikong_run_that_cannot_open_its_store_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "gw.toml").write_text('[store]\nurl = "postgresql://nobody@127.0.0.1:1/none"\n')
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(tmp_path / "gw.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "cannot start:" in r.stderr and "Traceback" not in r.stderr and "stopped" in r.stderr


def test_a_channel_reads_the_items_it_is_given_and_at_least_energy_and_the_relay(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('[[channels]]\nkind = "dlt645_tcp"\nname = "lean"\nhost = "h"\nport = 1\n'
                    'items = ["forward_active_energy_block", "status_word_3"]\n'
                    '[[channels]]\nkind = "dlt645_tcp"\nname = "blind"\nhost = "h"\nport = 2\nitems = ["voltage_a"]\n'
                    '[[channels]]\nkind = "concentrator"\nname = "c"\nid = "c1"\nmode = "json"\n'
                    'items = ["forward_active_energy_block", "status_word_3", "colour"]\n')
    config, errors = check_service_config(path)
    assert errors == [
        f"{path}: channels[1]: items ['voltage_a']: must include forward_active_energy_block, status_word_3 (the "
        f"energy registers bill, status word 3 is the relay's position)",
        f"{path}: channels[2]: items: unknown item(s) ['colour'] in json mode"]
    path.write_text('[[channels]]\nkind = "dlt645_tcp"\nname = "lean"\nhost = "h"\nport = 1\n'
                    'items = ["forward_active_energy_block", "status_word_3"]\n')
    config, errors = check_service_config(path)
    assert errors == []
    from gateway.service import Service
    assert Service(config)._channel(config.channels[0]).items == ("forward_active_energy_block", "status_word_3")


CLASHES = """
[http]
port = 9108
[metrics]
port = 9108
[[channels]]
kind = "dlt645_tcp"
name = "a"
host = "10.0.0.1"
port = 6001
[[channels]]
kind = "modbus_tcp"
name = "b"
host = "10.0.0.1"
port = 6001
[[channels]]
kind = "dlt645_serial"
name = "c"
device = "/dev/ttyUSB0"
[[channels]]
kind = "modbus_rtu"
name = "d"
device = "/dev/../dev/ttyUSB0"
[[channels]]
kind = "concentrator"
name = "e"
id = "c7"
[[channels]]
kind = "concentrator"
name = "f"
id = "c7"
mode = "json"
[[channels]]
kind = "dlt645_tcp"
name = "g"
host = "10.0.0.1"
port = 6002
[[channels]]
kind = "modbus_tcp"
name = "h"
host = "10.0.0.1"
port = 502
unreachable_after = 0
"""


def test_two_channels_on_one_line_or_one_port_for_two_listeners_are_refused(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(CLASHES)
    config, errors = check_service_config(path)
    assert config is None
    expected = [
        "metrics.port: 9108 is also [http]'s port on 127.0.0.1",
        "channels[1].port: 10.0.0.1:6001 is also channels[0]'s line",
        "channels[3].device: /dev/../dev/ttyUSB0 is also channels[2]'s line",
        "channels[7]: unreachable_after must be 1 or more (failed cycles), got 0",
        "channels[5].id: concentrator id 'c7' is also channels[4]'s line",
    ]
    for text in expected:
        assert any(text in e for e in errors), f"{text!r} not among:\n" + "\n".join(errors)
    assert len(errors) == len(expected), "\n".join(errors)
