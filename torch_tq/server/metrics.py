"""Prometheus metrics of a node (``serve(metrics_port=...)``, ``--metrics-port``), through
``prometheus-client``: read from the server's own counters when scraped, so a call pays
nothing for them beyond what ``Stats`` already counts.

Every metric carries the ``node`` label (its cluster name, else its location), so one
Prometheus scrapes a fleet; ``deploy/grafana/torch-tq.json`` charts them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch_tq.errors import InvalidArgument
from torch_tq.server.stats import LATENCY_BUCKETS
from torch_tq.store.groups import group_counts

if TYPE_CHECKING:
    from torch_tq.server.flight import TQFlightServer

log = logging.getLogger(__name__)


class NodeCollector:
    """What a scrape of one node reads."""

    def __init__(self, server: TQFlightServer, node: str) -> None:
        self.server = server
        self.node = node

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        server, node = self.server, self.node
        stats = server.stats.snapshot()
        limiter = server.limiter.snapshot()

        calls = CounterMetricFamily("torch_tq_calls", "Calls by Flight method or action",
                                    labels=["node", "method"])
        for method, n in stats["calls"].items():
            calls.add_metric([node, method], n)
        yield calls
        errors = CounterMetricFamily("torch_tq_errors", "Failed calls by error code",
                                     labels=["node", "code"])
        for code, n in stats["errors"].items():
            errors.add_metric([node, code], n)
        yield errors
        for name, key, text in (("torch_tq_received_bytes", "bytes_in", "Bytes received"),
                                ("torch_tq_sent_bytes", "bytes_out", "Bytes sent")):
            family = CounterMetricFamily(name, text, labels=["node"])
            family.add_metric([node], stats[key])
            yield family
        rejected = CounterMetricFamily("torch_tq_rejected", "Calls turned away by a limit or "
                                       "quota, by reason", labels=["node", "reason"])
        for reason, n in limiter["rejected"].items():
            rejected.add_metric([node, reason], n)
        yield rejected
        latency = HistogramMetricFamily("torch_tq_call_seconds", "Handler time of calls (a "
                                        "stream handed over may still be sending)",
                                        labels=["node", "method"])
        for method, (counts, total) in server.stats.latencies().items():
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([node, method], buckets, total)
        yield latency
        for name, value, text in (
                ("torch_tq_stored_matrices", server.store.count(), "Matrices stored"),
                ("torch_tq_stored_bytes", server.store.total_bytes(), "Bytes stored"),
                ("torch_tq_active_calls", stats["active_calls"], "Calls running now"),
                ("torch_tq_clients_active", limiter["clients_active"], "Clients with calls "
                 "running now")):
            family = GaugeMetricFamily(name, text, labels=["node"])
            family.add_metric([node], value)
            yield family
        groups = GaugeMetricFamily("torch_tq_group_items", "Index_ids of a consumer group by "
                                   "state", labels=["node", "group", "state"])
        for counts in group_counts(server.queue):
            for state in ("ready", "leased", "consumed"):
                groups.add_metric([node, counts["group"], state], counts[state])
        yield groups


def start_metrics(server: TQFlightServer, host: str, port: int, node: str):
    """Serves ``/metrics`` on ``host:port`` from a thread; returns the HTTP server (its
    ``server_port`` is the port, when 0 picked one).

    Raises:
        InvalidArgument: prometheus-client is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise InvalidArgument("metrics_port needs prometheus-client: pip install "
                              "'torch_tq[metrics]'") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(server, node))
    http, _thread = start_http_server(port, addr=host, registry=registry)
    return http
