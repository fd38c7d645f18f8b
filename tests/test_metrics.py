"""Prometheus metrics of a node, scraped over HTTP from a real server and checked against
its own Stats; the Grafana dashboard charts only metrics a node exports."""

from __future__ import annotations

import json
import os
import re
import urllib.request

import pytest
import torch

import torch_tq

prom = pytest.importorskip("prometheus_client",
                           reason="the metrics need prometheus-client (torch_tq[metrics])")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=20).read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_node_serves_its_metrics(tmp_path):
    with torch_tq.start_server(storage="memory", metrics_port=0, qps=50, qps_burst=2,
                               node_name="n0", cluster_nodes="n0") as srv:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", srv.metrics_url)
        client = torch_tq.Client(srv.location, transport="grpc")  # retries when turned away
        flood = torch_tq.Client(srv.location, transport="grpc", retry_deadline=0)
        client.put(1, "prompt", torch.ones(256))
        client.get(1, "prompt")
        with pytest.raises(torch_tq.NotFound):
            client.get(2, "prompt")
        client.consume("g", ["prompt"], max_items=1)
        turned_away = 0
        for _ in range(30):  # over the quota: some are turned away
            try:
                flood.health()
            except torch_tq.Unavailable:
                turned_away += 1
        assert turned_away
        stats = torch_tq.Client(srv.location, transport="grpc").server_stats()
        samples = _scrape(srv.metrics_url)
        node = {"node": "n0"}
        assert _value(samples, "torch_tq_calls_total", method="do_put", **node) == 1
        assert _value(samples, "torch_tq_errors_total", code="NOT_FOUND", **node) == 1
        assert _value(samples, "torch_tq_stored_matrices", **node) == 1
        assert _value(samples, "torch_tq_stored_bytes", **node) == 1024
        assert _value(samples, "torch_tq_received_bytes_total", **node) >= 1024
        assert _value(samples, "torch_tq_group_items", group="g", state="leased", **node) == 1
        assert _value(samples, "torch_tq_group_items", group="g", state="ready", **node) == 0
        rejected = sum(v for (name, labels), v in samples.items()
                       if name == "torch_tq_rejected_total")
        assert rejected >= turned_away
        # the histogram counts every call its method made, and agrees with Stats
        for method in ("do_put", "do_get"):
            count = _value(samples, "torch_tq_call_seconds_count", method=method, **node)
            assert count == stats["calls"][method]
            assert _value(samples, "torch_tq_call_seconds_bucket", method=method, le="+Inf",
                          **node) == count
            assert _value(samples, "torch_tq_call_seconds_sum", method=method, **node) > 0
        # the Grafana dashboard charts only what a node exports
        with open(os.path.join(ROOT, "deploy", "grafana", "torch-tq.json")) as f:
            dashboard = json.load(f)
        used = {name for panel in dashboard["panels"] for target in panel["targets"]
                for name in re.findall(r"torch_tq_[a-z_]+", target["expr"])}
        assert len(dashboard["panels"]) >= 8
        assert used <= {name for name, _ in samples}, used - {name for name, _ in samples}
