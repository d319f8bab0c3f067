"""Smoke test: bench/codec.py --quick runs, verifies both codecs and reports five positive rates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dlt645")

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
