"""Deployment files, checked where Docker's engine does not run: the compose file parses, every file it
mounts exists, its gateway config passes `config check`, its simulators serve exactly the fleet that config
lists; the Dockerfile is multi-stage, non-root, with a health check; the systemd unit verifies."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import load_service_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
#: files the metrics helper's part provides (config/prometheus/, config/grafana/)
METRICS_PARTS = ("config/prometheus", "config/grafana")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_every_service_and_every_mounted_file_exists():
    services = compose()["services"]
    assert {"mosquitto", "postgres", "prometheus", "grafana", "gateway", "sim-dlt645", "sim-modbus",
            "sim-concentrator-c1", "sim-concentrator-c2", "sim-billing"} <= set(services)
    mounts = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                mounts.append((name, (DEPLOY / source).resolve()))
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert len(mounts) >= 6
    missing = [(n, p) for n, p in mounts if not p.exists()]
    metrics_merged = all((ROOT / part).exists() for part in METRICS_PARTS)
    if not metrics_merged:  # this branch alone: only the metrics part's own files may be absent
        missing = [(n, p) for n, p in missing if not any(str(p).startswith(str(ROOT / m)) for m in METRICS_PARTS)]
    assert missing == []
    if not metrics_merged:
        pytest.skip("config/prometheus and config/grafana come with the metrics part; the rest was checked")


def test_the_compose_gateway_runs_the_deploy_config_which_passes_the_check():
    gateway = compose()["services"]["gateway"]
    assert gateway["command"] == ["run", "--config", "/etc/feikong/gateway.toml"]
    assert "./:/etc/feikong:ro" in gateway["volumes"] and "../config:/etc/config:ro" in gateway["volumes"]
    config = load_service_config(DEPLOY / "gateway.toml")
    assert config.store.url.startswith("postgresql://feikong@postgres") and "PGPASSWORD" in gateway["environment"]
    assert (config.mqtt.host, config.mqtt.port) == ("mosquitto", 1883)
    assert (config.http.host, config.metrics.host) == ("0.0.0.0", "0.0.0.0")
    published = {p.split(":")[1] for p in gateway["ports"]}
    assert {str(config.http.port), str(config.metrics.port)} <= published
    health = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{config.http.port}/api/v1/health" in health


def test_the_compose_simulators_serve_the_fleet_the_gateway_config_lists():
    """Each channel of deploy/gateway.toml is a simulator service of compose.yml, serving exactly the meters
    deploy/fleet.csv puts on that channel (addresses, Modbus device ids)."""
    services = compose()["services"]
    config = load_service_config(DEPLOY / "gateway.toml")
    parser = build_parser()
    served = {}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] != ["sim"] or name == "sim-billing":
            continue
        args = parser.parse_args(command)
        first = int(args.first_address)
        addresses = [f"{a:012d}" for a in range(first, first + args.meters)]
        if args.sim == "concentrator":
            key = ("concentrator", args.id, args.mode)
            assert args.broker == f"{config.mqtt.host}:{config.mqtt.port}"
        else:
            host, port = args.tcp.rsplit(":", 1)
            assert host == "0.0.0.0"
            key = (args.sim, name, int(port))
        devices = list(range(args.first_device, args.first_device + args.meters)) if args.sim == "modbus" else []
        served[key] = (addresses, devices)
    assert len(served) == len(config.channels) == 4
    for c in config.channels:
        key = ("concentrator", c.id, c.mode) if c.kind == "concentrator" else (c.kind.split("_")[0], c.host, c.port)
        addresses, devices = served[key]
        meters = config.meters_on(c.name)
        assert [m.meter_id for m in meters] == addresses, c.name
        if devices:
            assert [config.devices[m.meter_id] for m in meters] == devices
    sims = [s for n, s in services.items() if n.startswith("sim-")]
    assert all(s["healthcheck"] == {"disable": True} for s in sims)  # no API in a simulator container


def test_the_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build"
    runtime = text.split("\nFROM ", 2)[2]
    assert "COPY --from=build /wheels" in runtime and "pip wheel" in text.split("\nFROM ", 2)[1]
    user = re.search(r"^USER (\S+)", runtime, re.M).group(1)
    assert user not in ("root", "0") and f"useradd --system" in runtime
    health = re.search(r"^HEALTHCHECK .*?\n(?:\s+.*\n)*", runtime, re.M).group(0)
    assert "/api/v1/health" in health and "8080" in health
    assert re.search(r'^ENTRYPOINT \["feikong"\]', runtime, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_the_systemd_unit(tmp_path):
    text = (DEPLOY / "feikong.service").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["User"] == "feikong" and keys["Restart"] == "on-failure"
    assert keys["ExecStart"].endswith("feikong run --config /etc/feikong/gateway.toml")
    assert keys["ExecStartPre"].endswith("feikong config check /etc/feikong/gateway.toml")
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "RestrictAddressFamilies",
                      "CapabilityBoundingSet", "SystemCallFilter"):
        assert hardening in keys, hardening
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit's keys were checked, not verified by systemd")
    feikong = shutil.which("feikong") or str(Path(__import__("sys").executable).parent / "feikong")
    unit = tmp_path / "feikong.service"
    unit.write_text(text.replace("/opt/feikong/bin/feikong", feikong))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
