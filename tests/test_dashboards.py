"""Every dashboard panel, evaluated by a real Prometheus scraping a daemon that did real work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daemon.testing import REPO, copy_plugin, free_port, start_daemon
from tests.test_runtime import FP, wait_for

DASHBOARD = REPO / "dashboards" / "grafana" / "plugin-daemon.json"
PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus" / "prometheus.yml"
VARIABLES = {"$__rate_interval": "20s", "$plugin_id": ".*"}
METRIC = re.compile(r"\b((?:plugin|process)_[a-z_]+)\b")
LABELS = re.compile(r"\{[^}]*\}|\b(?:by|without) \([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a query reads (label matchers and grouping labels removed)."""
    return set(METRIC.findall(LABELS.sub("", expr)))


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


class Prometheus:
    def __init__(self, tmp: Path, target: str, key: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "Prometheus is missing: scripts/system-deps.sh installs Debian's prometheus"
        # The committed configuration, pointed at this daemon and scraping every second.
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        (tmp / "server.key").write_text(key)
        job["authorization"]["credentials_file"] = str(tmp / "server.key")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A daemon that served successes, failures, a crash and a timeout while being scraped."""
    tmp_path = tmp_path_factory.mktemp("dashboards")
    (tmp_path / "plugins").mkdir()
    copy_plugin("fastproto", tmp_path / "plugins")
    daemon = start_daemon(
        tmp_path / "plugins",
        tmp_path / "state",
        tmp_path / "daemon.log",
        metrics_access="key",
        plugin_max_execution_timeout=1,
        plugin_resource_sample_interval=0.5,
    )
    daemon.wait_ready(FP)
    prometheus = Prometheus(tmp_path, daemon.url.removeprefix("http://"), daemon.key)
    stop = threading.Event()

    def traffic() -> None:  # bounded: stops when the test has its samples, or after 60 s
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            daemon.invoke(FP, "emit", {"count": 5, "variables": 5})
            daemon.invoke(FP, "emit", {"count": 1, "violate": True})
            daemon.invoke(FP, "emit", {"count": 2, "error_at": 1})

    try:
        wait_for(lambda: _up(prometheus), limit=60)
        daemon.invoke(FP, "emit", {"count": 2, "crash_at": 1})
        daemon.wait_ready(FP)
        daemon.invoke(FP, "emit", {"hang": True})  # ends by the 1 s timeout
        worker = threading.Thread(target=traffic)
        worker.start()
        # Enough scrapes for rate() over 20 s windows to see the traffic.
        wait_for(lambda: _samples(prometheus) >= 8, limit=60)
        stop.set()
        worker.join()
        yield daemon, prometheus
    finally:
        stop.set()
        prometheus.stop()
        daemon.stop()


def _up(prometheus: Prometheus) -> bool:
    try:
        result = prometheus.query('up{job="plugin-daemon"}')
    except (httpx.HTTPError, AssertionError, ValueError):
        return False
    return bool(result) and result[0]["value"][1] == "1"


def _samples(prometheus: Prometheus) -> int:
    result = prometheus.query('count_over_time(up{job="plugin-daemon"}[1m])')
    return int(float(result[0]["value"][1])) if result else 0


def test_every_panel_query_returns_data_and_names_only_exported_metrics(scraped: Any) -> None:
    daemon, prometheus = scraped
    exposition = httpx.get(f"{daemon.url}/metrics", headers={"X-Api-Key": daemon.key}).text
    exported = {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}
    queries = panel_queries()
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{title} names metrics the daemon does not export: {unknown}"
        if not prometheus.query(expr):
            empty.append(title)
    assert not empty, f"panels without data: {empty}"


def test_latency_exemplars_carry_trace_ids(scraped: Any) -> None:
    _, prometheus = scraped
    r = httpx.get(
        f"{prometheus.url}/api/v1/query_exemplars",
        params={
            "query": "plugin_invocation_duration_seconds_bucket",
            "start": time.time() - 300,
            "end": time.time(),
        },
        timeout=30,
    )
    series = r.json()["data"]
    trace_ids = {e["labels"]["trace_id"] for s in series for e in s["exemplars"]}
    assert trace_ids and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids)


def test_metric_names_are_read_from_queries() -> None:
    expr = 'sum by (plugin_id) (rate(plugin_invocations_total{plugin_id=~".*",status!="x"}[1m]))'
    assert metric_names(expr) == {"plugin_invocations_total"}


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in (
        "Invocations per second",
        "Error ratio",
        "Invocation duration",
        "Time to first event",
        "Active sessions",
        "Validation failures by design",
        "Serialization share",
        "Instances up",
        "Restarts",
        "Plugin CPU",
        "Plugin memory (RSS) and limit",
        "Plugin open files and threads",
        "Resource kills",
    ):
        assert topic in titles
    datasources = yaml.safe_load(
        (REPO / "dashboards/grafana/provisioning/datasources/datasources.yml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert used <= uids
