"""A real Prometheus on a free port (Debian's ``prometheus``; ``./run test`` installs it), for the tests and the
dashboard picture: its own data directory, a scrape interval of a second; queried through its HTTP API.

Also what Grafana would ask it for a dashboard: every PromQL expression of a dashboard's panels (rows and
their nested panels alike) and templating, with the template variables at their "All" values.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .broker import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def available() -> bool:
    return Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()


class Prometheus:
    """One Prometheus process scraping ``targets`` (host:port) as job ``job``, evaluating ``rule_files``."""

    def __init__(self, directory: Path, targets: list[str], *, job: str = "feikong",
                 rule_files: list[Path] = (), interval_s: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "prometheus.yml"
        interval = f"{interval_s:g}s"
        self.config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(Path(r).resolve()) for r in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={self.config}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; the ``data`` of a success, ValueError with Prometheus' error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query: the result vector (or a scalar as a one-element list)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]


# ------------------------------------------------------------------ dashboards


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel that is not a row, in order, including the panels nested in (collapsed) rows."""
    out = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out.extend(dashboard_panels(p))
        else:
            out.append(p)
    return out


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, query) for every panel target (PromQL) and every query variable of the templating (PromQL, or
    Grafana's ``label_values(selector, label)``: :func:`label_values_selector` gives its PromQL)."""
    out = [(f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"])
           for p in dashboard_panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
        out.append((f"variable {v['name']}", q))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<sel>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def label_values_selector(query: str) -> tuple[str, str | None]:
    """``label_values(sel, label)`` -> (sel, label); any other query is PromQL as it is -> (query, None)."""
    m = _LABEL_VALUES.match(query)
    return (m["sel"], m["label"]) if m else (query, None)


def at_all(expr: str, dashboard: dict) -> str:
    """The expression as Grafana sends it with every variable at "All": ``$var`` and ``${var}`` become the
    variable's allValue (``.*``); Grafana's own ``$__rate_interval`` and ``$__interval`` become a minute."""
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            value = v.get("allValue") or ".*"
            expr = expr.replace("${%s}" % v["name"], value).replace("$" + v["name"], value)
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
