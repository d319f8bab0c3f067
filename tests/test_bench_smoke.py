"""Smoke tests: bench/codec.py --quick runs, verifies both codecs and reports five positive rates; bench/engine.py
--quick runs its verified engine / SQLite / PostgreSQL / naive measurements and reports positive rates;
bench/relay.py --quick runs its verified close-latency measurement of both verification strategies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
KEYS = ("ours_decode_per_s", "ours_decode_value_per_s", "ours_encode_per_s", "peer_decode_per_s", "peer_encode_per_s")


def test_codec_bench_quick(tmp_path):
    out = tmp_path / "codec.json"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    proc = subprocess.run([python, str(ROOT / "bench" / "codec.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in KEYS:
        assert isinstance(summary[key], (int, float)) and summary[key] > 0, (key, summary)
    saved = json.loads(out.read_text())
    assert saved["results"] == summary
    assert {"python", "platform", "cpu_count", "date"} <= saved["machine"].keys()


ENGINE_KEYS = ("evaluations_per_s", "readings_per_s", "pg_readings_per_s", "naive_readings_per_s",
               "readings_ratio_over_naive", "decisions", "batch_size", "peak_rss_mb")


def test_engine_bench_quick(tmp_path, pg_server):
    """bench/engine.py --quick verifies its results (transitions, stored rows and charges, decisions, the naive
    baseline against the engine) before it reports; here: it ran, on SQLite and PostgreSQL, and saved them."""
    out = tmp_path / "engine.json"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    env = dict(os.environ, FEIKONG_PG_DSN=pg_server)
    proc = subprocess.run([python, str(ROOT / "bench" / "engine.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ENGINE_KEYS:
        assert isinstance(summary[key], (int, float)) and summary[key] > 0, (key, summary)
    saved = json.loads(out.read_text())
    assert saved["results"] == summary
    assert saved["sqlite"]["verified"]["readings_rows"] == saved["postgresql"]["verified"]["readings_rows"] > 0
    assert {"python", "platform", "cpu_count", "date"} <= saved["machine"].keys()


def test_relay_bench_quick(tmp_path):
    """bench/relay.py --quick verifies (every close confirmed, every relay read closed by a separate client, one
    close frame per meter in the simulators' own logs) before it reports both verification strategies."""
    out = tmp_path / "relay.json"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    proc = subprocess.run([python, str(ROOT / "bench" / "relay.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("close_latency_p50_s", "close_latency_p99_s", "fixed_settle_p50_s", "fixed_settle_p99_s"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary)
    saved = json.loads(out.read_text())
    assert saved["results"] == summary
    assert all(run["verified"]["one_close_frame_per_meter"] for run in saved["runs"].values())


MQTT_KEYS = ("payments_per_s", "events_per_s", "paho_floor_per_s", "payments_over_floor")


def test_mqtt_bench_quick(tmp_path):
    """bench/mqtt.py --quick checks the ledger and the events before it reports; here: it ran against its own
    broker, reported positive rates for both sides, and saved them."""
    out = tmp_path / "mqtt.json"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    proc = subprocess.run([python, str(ROOT / "bench" / "mqtt.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in MQTT_KEYS:
        assert isinstance(summary[key], (int, float)) and summary[key] > 0, (key, summary)
    assert json.loads(out.read_text())["results"] == summary
