"""Configuration files: the example is complete and true to the defaults; a wrong value names its key."""
from pathlib import Path

import pytest

from gateway.config import load_control_config
from gateway.core.config import ConfigError, build
from gateway.core.control import ControlConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "control.example.toml"


def test_the_example_sets_every_default_exactly():
    assert load_control_config(EXAMPLE) == ControlConfig()


def test_the_example_names_every_setting():
    """Every setting of every policy appears in the example (so operators can find it)."""
    import dataclasses
    import typing

    text = EXAMPLE.read_text()

    def names(cls, seen=()):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from names(hint)
            else:
                yield f.name

    missing = [n for n in names(ControlConfig) if n not in text]
    assert missing == [], missing


def _load(tmp_path, text):
    p = tmp_path / "control.toml"
    p.write_text(text)
    return load_control_config(p)


@pytest.mark.parametrize("text, message", [
    ('[trips]\nnotice_lead = "24h"', r"trips\.notice_lead: unknown setting; allowed here: notice_lead_s,"),
    ('[trips]\nnotice_lead_s = "a day"', r"trips\.notice_lead_s: 'a day' is not a duration"),
    ('[trips]\ndaily_cap_per_area = 2.5', r"trips\.daily_cap_per_area: expected a whole number, got 2.5"),
    ('[trips]\ndaily_cap_per_area = 0', r"trips: the daily cap for area \(default\) must be a whole number >= 1"),
    ('[trips.window]\nhours = "16:00-09:00"', r"trips\.window: hours: '16:00-09:00' must start before it ends"),
    ('[trips.window]\nforbid_fridays = "yes"', r"trips\.window\.forbid_fridays: expected true or false, got 'yes'"),
    ('[trips.grace_s]\ngold = 10', r"trips: grace_s: unknown customer class 'gold'"),
    ('[notices.channels.sms]\ntimeout_s = 0', r"notices\.channels\.sms: timeout_s must be positive"),
    ('[notices]\nlast_resort = ["pigeon"]', r"notices: last_resort: unknown channel\(s\) \['pigeon'\]"),
    ('[commands.close]\nmax_attempts = 2\ndispatch_after_failures = 3',
     r"commands: close\.dispatch_after_failures \(3\) must be below max_attempts \(2\)"),
    ('[trips]\ntrip_command_ttl_s = 0', r"trips: trip_command_ttl_s must be positive"),
    ('[commands.trip]\nframe_validity_s = 0', r"commands: trip\.frame_validity_s must be positive"),
    ('balance_recheck_s = "0s"', r"balance_recheck_s must be positive"),
    ('[authority]\nmanual_trip_roles = ["intern"]', r"authority: manual_trip_roles: unknown role\(s\) \['intern'\]"),
    ('[calendar]\nextra_holidays = ["2027-02-30"]', r"calendar: extra_holidays: '2027-02-30' is not an ISO date"),
    ('[calendar]\ncountry = "XX"', r"calendar: country: no holiday calendar for 'XX'"),
    ('trips = 3', r"trips: expected a table of settings, got 3"),
    ('[trips\n', r"not valid TOML"),
])
def test_a_wrong_value_is_refused_with_its_key_and_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_durations_and_partial_files(tmp_path):
    cfg = _load(tmp_path, '[trips]\nnotice_lead_s = "36h"\n[commands.close]\nverify_first_s = "250ms"\n'
                          'max_attempts = 12\n[trips.area_caps]\nnorth = 20\n')
    assert cfg.trips.notice_lead_s == 36 * 3600 and cfg.commands.close.verify_first_s == 0.25
    assert cfg.commands.close.max_attempts == 12 and cfg.commands.close.backoff_s == 10  # the rest: defaults
    assert cfg.trips.cap_for("north") == 20 and cfg.trips.cap_for("south") == 200
    cfg = _load(tmp_path, '[notices.channels.sms]\ntimeout_s = "20min"\n[notices.channels.wechat]\ntimeout_s = "1h"\n')
    assert cfg.notices.channels["sms"].timeout_s == 1200 and cfg.notices.channels["sms"].hours == "08:00-21:00"
    assert set(cfg.notices.channels) == {"sms", "voice", "app", "email", "paper", "wechat"}
    with pytest.raises(ConfigError, match="cannot read"):
        load_control_config(tmp_path / "missing.toml")


def test_build_refuses_anything_but_a_table():
    with pytest.raises(ConfigError, match="expected a table of settings"):
        build(ControlConfig, ["trips"], "control")


# ---------------------------------------------------------------- the gateway's [mqtt] table

import re  # noqa: E402

from gateway.config import load_broker_config  # noqa: E402
from gateway.northbound.mqtt import BrokerConfig  # noqa: E402


def test_the_example_gateway_config_is_every_broker_setting_at_its_default():
    path = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"
    assert load_broker_config(path) == BrokerConfig()
    import dataclasses, tomllib
    assert set(tomllib.loads(path.read_text())["mqtt"]) == {f.name for f in dataclasses.fields(BrokerConfig)}


@pytest.mark.parametrize("text,message", [
    ('[mqtt]\nport = "1883x"\n', "mqtt.port: expected a number"),
    ('[mqtt]\nhots = "x"\n', "mqtt.hots: unknown setting"),
    ('[mqtt]\ninstance = "gw/1"\n', "instance 'gw/1' must be non-empty, without '/'"),
    ('[mqtt]\ntls_cert_file = "c.pem"\n', "tls_cert_file and tls_key_file go together"),
    ('[mqtt]\nsession_expiry_s = "forever"\n', "mqtt.session_expiry_s: 'forever' is not a duration"),
    ('[other]\n', "no [mqtt] table"),
])
def test_a_bad_broker_setting_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_broker_config(path)
    assert str(path) in str(err.value)
