"""Smoke tests: each benchmark's --quick run verifies its own results before it reports (see each bench's
docstring); here: it ran, reported positive figures on its last line, and saved the same in its file.
bench/codec.py: both codecs; bench/engine.py: the engine, SQLite, PostgreSQL and the naive baseline;
bench/relay.py: both verification strategies; bench/mqtt.py: the gateway beside paho's floor; bench/e2e.py: a
5,000-meter fleet through the whole service with payments over MQTT, every close verified in the simulators."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def run_quick(bench: str, tmp_path: Path, keys: tuple[str, ...], timeout: float, env: dict | None = None) -> dict:
    """Run bench/<bench>.py --quick; check its figures; return what it saved."""
    out = tmp_path / f"{bench}.json"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    proc = subprocess.run([python, str(ROOT / "bench" / f"{bench}.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in keys:
        assert isinstance(summary[key], (int, float)) and summary[key] > 0, (key, summary)
    saved = json.loads(out.read_text())
    assert saved["results"] == summary
    assert {"python", "platform", "cpu_count", "date"} <= saved["machine"].keys()
    return saved


def test_codec_bench_quick(tmp_path):
    run_quick("codec", tmp_path, ("ours_decode_per_s", "ours_decode_value_per_s", "ours_encode_per_s",
                                  "peer_decode_per_s", "peer_encode_per_s"), 60)


def test_engine_bench_quick(tmp_path, pg_server):
    saved = run_quick("engine", tmp_path, ("evaluations_per_s", "readings_per_s", "pg_readings_per_s",
                                           "naive_readings_per_s", "readings_ratio_over_naive", "decisions",
                                           "batch_size", "peak_rss_mb"),
                      60, env=dict(os.environ, FEIKONG_PG_DSN=pg_server))
    assert saved["sqlite"]["verified"]["readings_rows"] == saved["postgresql"]["verified"]["readings_rows"] > 0


def test_relay_bench_quick(tmp_path):
    saved = run_quick("relay", tmp_path, ("close_latency_p50_s", "close_latency_p99_s", "fixed_settle_p50_s",
                                          "fixed_settle_p99_s"), 120)
    assert all(run["verified"]["one_close_frame_per_meter"] for run in saved["runs"].values())


def test_mqtt_bench_quick(tmp_path):
    saved = run_quick("mqtt", tmp_path, ("payments_per_s", "events_per_s", "paho_floor_per_s",
                                         "payments_over_floor"), 300)
    assert saved["machine"]["broker"].startswith("mosquitto")
    assert saved["results"]["rounds"] == len(saved["results"]["runs"])


def test_e2e_bench_quick(tmp_path):
    saved = run_quick("e2e", tmp_path, ("meters", "read_cycle_s", "bus_utilisation", "close_latency_p50_s",
                                        "close_latency_p99_s", "engine_readings_per_s", "peak_rss_mb",
                                        "fleet_peak_rss_mb", "payments"), 600)
    results, verified = saved["results"], saved["details"]["verified"]
    assert results["verified"] is True
    assert verified["closes_confirmed"] == verified["payments_in_ledger_once"] == results["payments"]
    assert verified["relays_closed_by_one_close_in_the_simulators"] == results["payments"]
    assert verified["second_cycle_readings"] == results["meters"] == 5000
    assert verified["second_cycle_answered"] >= 5000 - verified["silent_by_fault"] - 50
    assert saved["items"] == ["forward_active_energy_block", "status_word_3"]
