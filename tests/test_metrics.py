"""``/metrics`` in Prometheus text format, and who may read the operator endpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.testing import Daemon
from tests.test_runtime import FP, wait_for


def scrape(daemon: Daemon, **headers: str) -> dict[str, float]:
    r = httpx.get(f"{daemon.url}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@pytest.mark.parametrize("otel_sdk_disabled", ["false", "true"], ids=["tracing on", "tracing off"])
def test_metrics_count_what_the_daemon_did(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], otel_sdk_disabled: str
) -> None:
    """With tracing off the daemon takes another path (no spans at all): it counts the same."""
    daemon = start(fastproto(), otel_sdk_disabled=otel_sdk_disabled)
    daemon.wait_ready(FP)
    for _ in range(3):
        assert daemon.invoke(FP, "emit", {"count": 2, "variables": 3})[-1].ok
    assert not daemon.invoke(FP, "emit", {"violate": True})[-1].ok
    assert not daemon.invoke(FP, "emit", {"count": 2, "crash_at": 1})[-1].ok
    daemon.wait_ready(FP)
    m = scrape(daemon)
    plugin = f'plugin_id="{FP}"'
    assert m[f'plugin_invocations_total{{operation="invoke_tool",{plugin},status="success"}}'] == 3
    assert m[f'plugin_invocations_total{{operation="invoke_tool",{plugin},status="validation_failed"}}'] == 1
    assert m[f'plugin_invocations_total{{operation="invoke_tool",{plugin},status="instance_died"}}'] == 1
    assert m[f'plugin_invocation_duration_seconds_count{{operation="invoke_tool",{plugin}}}'] == 5
    assert m[f"plugin_time_to_first_event_seconds_count{{{plugin}}}"] == 5
    assert m[f"plugin_invocations_active{{{plugin}}}"] == 0
    assert m[f"plugin_messages_relayed_total{{{plugin}}}"] == 3 * (2 + 3 + 1) + 2 + 1
    assert m[f'plugin_bytes_relayed_total{{direction="out",{plugin}}}'] > 0
    assert m['plugin_output_validations_total{design="owner",verdict="pass"}'] == 3
    assert m['plugin_output_validations_total{design="owner",verdict="fail"}'] == 1
    assert m['plugin_output_validations_total{design="lock",verdict="pass"}'] == 0
    assert m['plugin_output_validation_duration_seconds_count{design="owner"}'] == 4
    assert m['plugin_serialization_seconds_total{direction="decode"}'] > 0
    assert m['plugin_serialization_seconds_total{direction="encode"}'] > 0
    assert m[f"plugin_instance_restarts_total{{{plugin}}}"] == 1
    assert m[f'plugin_instance_up{{instance="0",{plugin}}}'] == 1
    assert m[f'plugin_instance_ready{{instance="0",{plugin}}}'] == 1
    assert m[f'plugin_session_buffer_bytes{{instance="0",{plugin}}}'] == 0
    assert m[f"plugin_session_buffer_peak_bytes_count{{{plugin}}}"] == 5
    assert m["process_cpu_seconds_total{}"] > 0


def test_terminations_by_timeout_and_slow_client_are_counted(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), plugin_max_execution_timeout=1)
    daemon.wait_ready(FP)
    assert (
        daemon.invoke(FP, "emit", {"hang": True})[-1].error["error_type"] == "PluginDaemonInternalServerError"
    )
    m = scrape(daemon)
    assert m[f'plugin_session_terminations_total{{plugin_id="{FP}",reason="timeout"}}'] == 1
    assert m[f'plugin_session_terminations_total{{plugin_id="{FP}",reason="slow_client"}}'] == 0
    assert m[f'plugin_invocations_total{{operation="invoke_tool",plugin_id="{FP}",status="timeout"}}'] == 1


def test_an_instance_that_is_down_is_reported(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto({"exit_during_start": 3}))
    wait_for(lambda: daemon.plugins()[FP]["restarts"] >= 1)
    m = scrape(daemon)
    assert m[f'plugin_instance_ready{{instance="0",plugin_id="{FP}"}}'] == 0
    assert m[f'plugin_instance_restarts_total{{plugin_id="{FP}"}}'] >= 1


@pytest.mark.parametrize("path", ["/metrics", "/debug/traces"])
def test_key_access_asks_every_client_for_the_key(
    start: Callable[..., Daemon], fastproto: Callable[..., Path], path: str
) -> None:
    daemon = start(fastproto(), metrics_access="key", debug_access="key")
    url = f"{daemon.url}{path}"
    refused = httpx.get(url)
    if path == "/metrics":
        assert refused.status_code == 401 and "needs the server key" in refused.json()["message"]
    else:  # a browser is sent to the login form
        assert refused.status_code == 303 and refused.headers["location"].startswith("/debug/login?next=")
    assert httpx.get(url, headers={"X-Api-Key": daemon.key}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {daemon.key}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code in (401, 303)


def test_the_login_form_sets_a_cookie_that_opens_the_debug_pages(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    daemon = start(fastproto(), debug_access="key")
    with httpx.Client(base_url=daemon.url, follow_redirects=True) as browser:
        form = browser.get("/debug/traces")
        assert form.url.path == "/debug/login" and "Server key" in form.text
        wrong = browser.post("/debug/login", data={"key": "nope", "next": "/debug/traces"})
        assert wrong.status_code == 401 and "wrong key" in wrong.text
        page = browser.post("/debug/login", data={"key": daemon.key, "next": "/debug/traces"})
        assert page.status_code == 200 and page.url.path == "/debug/traces" and "<h1>Traces</h1>" in page.text
        assert daemon.key not in str(browser.cookies)  # the cookie is derived, not the key
        evil = browser.post(
            "/debug/login", data={"key": daemon.key, "next": "//evil.example/"}, follow_redirects=False
        )
        assert evil.headers["location"] == "/debug/traces"
    assert httpx.get(f"{daemon.url}/metrics").status_code == 200  # loopback default for metrics


def test_off_hides_the_endpoints(start: Callable[..., Daemon], fastproto: Callable[..., Path]) -> None:
    daemon = start(fastproto(), metrics_access="off", debug_access="off")
    for path in ("/metrics", "/debug/traces", "/debug/login"):
        r = httpx.get(f"{daemon.url}{path}", headers={"X-Api-Key": daemon.key})
        assert r.status_code == 404 and "turned off" in r.json()["message"]


def test_loopback_access_asks_forwarded_clients_for_the_key(
    start: Callable[..., Daemon], fastproto: Callable[..., Path]
) -> None:
    """Behind a reverse proxy on this machine, the forwarded client is not a local one."""
    daemon = start(fastproto())  # metrics_access and debug_access default to loopback
    remote = {"X-Forwarded-For": "203.0.113.7"}
    assert httpx.get(f"{daemon.url}/metrics").status_code == 200
    assert httpx.get(f"{daemon.url}/metrics", headers=remote).status_code == 401
    assert httpx.get(f"{daemon.url}/metrics", headers={**remote, "X-Api-Key": daemon.key}).status_code == 200
    assert httpx.get(f"{daemon.url}/debug/traces").status_code == 200
    assert httpx.get(f"{daemon.url}/debug/traces", headers=remote).status_code == 303


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_a_batch_histogram_is_exposed_as_prometheus_histogram_exposes_it(openmetrics: bool) -> None:
    """The batched histograms replace ``prometheus_client.Histogram``: same series, same text."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from daemon.metrics import LATENCY_BUCKETS, BatchHistogram

    values = [0.0, 0.001, 0.0011, 0.003, 0.3, 2.5, 7, 299.9, 300, 301, 1e9]
    exemplars = [None, {"trace_id": "a" * 32}, None, None, {"trace_id": "b" * 32}] + [None] * 6
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["plugin_id"], buckets=LATENCY_BUCKETS, registry=theirs)
    batch = BatchHistogram("h_seconds", "doc", ["plugin_id"], buckets=LATENCY_BUCKETS, registry=ours)
    reference.labels("p/untouched")
    batch.labels("p/untouched")
    for value, exemplar in zip(values, exemplars, strict=True):
        reference.labels("a/b").observe(value, exemplar)
    batch.labels("a/b").observe_many(values[:4], exemplars[:4])
    batch.labels("a/b").observe_many(values[4:], exemplars[4:])
    generate = generate_openmetrics if openmetrics else generate_latest

    def text(registry: CollectorRegistry) -> list[str]:  # exemplar timestamps differ
        return [
            line.rsplit(" ", 1)[0] if " # " in line else line
            for line in generate(registry).decode().splitlines()
        ]

    assert text(ours) == text(theirs)
