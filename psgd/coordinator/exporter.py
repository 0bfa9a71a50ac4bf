"""``/metrics``: a run in the Prometheus text format, through the official ``prometheus_client``.

The counters live in the servers and the workers, not here, so this is a custom collector
(the library's pattern for exporting another system's counters): at each scrape it reads
the run's snapshot (psgd.coordinator.live) and yields metric families. Names follow
Prometheus' conventions: a ``psgd_`` prefix, base units (seconds, bytes, ratios 0..1),
``_total`` on counters (the library adds it), labels for the worker, phase and error code.
README.md ("Prometheus") lists every metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..wire.protocol import ERROR_CODES, TIMING_KEYS
from .live import PHASES

# Upper bounds of the staleness histogram's buckets (the server keeps exact counts up to
# STALENESS_CAP - 1 and one overflow bucket, so any bound is exact; +Inf is added).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RunCollector:
    """Yields the metric families of ``source()`` (a snapshot dict) at each scrape."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        return []  # the families depend on the run (workers, codes): no fixed list to check against

    def collect(self):
        r = self.source()
        yield _counter("psgd_updates_applied", "Updates the servers applied (the model version).", r["updates"])
        yield _counter("psgd_examples", "Training examples in applied pushes.", r["examples"])
        yield _counter("psgd_received_bytes", "Bytes the servers received over ZeroMQ.", r["bytes_in"])
        yield _counter("psgd_sent_bytes", "Bytes the servers sent over ZeroMQ.", r["bytes_out"])
        refused = CounterMetricFamily("psgd_refused_pushes", "Requests the servers refused, by error code.",
                                      labels=["code"])
        for code in ERROR_CODES:  # every code, zeros too: a rate() needs the series to exist
            refused.add_metric([code], float(r["errors"].get(code, 0)))
        yield refused
        yield _staleness(r["staleness"])
        yield _gauge("psgd_learning_rate", "The learning rate in force.", r["lr"])
        yield _gauge("psgd_validation_loss", "Validation loss at the latest evaluation.", r["val_loss"])
        yield _gauge("psgd_validation_accuracy", "Validation accuracy (0..1) at the latest evaluation.",
                     r["val_accuracy"])
        yield _gauge("psgd_test_loss", "Test loss of the final weights (once the run finished).", r["test_loss"])
        yield _gauge("psgd_test_accuracy", "Test accuracy (0..1) of the final weights (once the run finished).",
                     r["test_accuracy"])
        yield _gauge("psgd_epochs", "Epochs of training examples applied, at the latest evaluation.", r["epochs"])
        yield _gauge("psgd_workers_alive", "Workers connected to the servers now.", r["workers_alive"])
        phase = GaugeMetricFamily("psgd_run_phase", "1 for the run's phase now, 0 for the others.", labels=["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if r["phase"] == name else 0.0)
        yield phase
        yield from _workers(r["workers"])


def _counter(name, doc, value):
    return CounterMetricFamily(name, doc, value=float(value or 0))


def _gauge(name, doc, value):
    family = GaugeMetricFamily(name, doc)
    if value is not None:  # unknown yet: no sample, rather than a made-up 0
        family.add_metric([], float(value))
    return family


def _staleness(hist: dict | None):
    """The server's exact staleness counts as a cumulative Prometheus histogram. The sum
    counts the overflow bucket (``cap`` or more) at ``cap``: a lower bound when it is used."""
    counts = (hist or {}).get("counts") or []
    cap = len(counts) - 1
    buckets, total, weighted = [], 0, 0
    for bound in STALENESS_BUCKETS:
        if counts:
            total = sum(counts[:min(bound, cap - 1) + 1])
        buckets.append((floatToGoString(bound), total))  # le="4.0", as the library writes its own
    all_pushes = sum(counts)
    weighted = sum(i * c for i, c in enumerate(counts))
    buckets.append(("+Inf", all_pushes))
    return HistogramMetricFamily("psgd_push_staleness", "Staleness of applied pushes: updates applied between "
                                 "the weights a gradient was computed from and its own.",
                                 buckets=buckets, sum_value=float(weighted))


def _workers(workers: dict):
    rate = GaugeMetricFamily("psgd_worker_examples_per_second", "A worker's examples/s over the last second or so.",
                             labels=["worker"])
    pushes = CounterMetricFamily("psgd_worker_pushes", "A worker's applied pushes.", labels=["worker"])
    refused = CounterMetricFamily("psgd_worker_refused_pushes", "A worker's refused pushes.", labels=["worker"])
    straggler = GaugeMetricFamily("psgd_worker_straggler", "1 if the worker runs below half the others' median rate.",
                                  labels=["worker"])
    up = GaugeMetricFamily("psgd_worker_connected", "1 if the worker is connected.", labels=["worker"])
    seconds = CounterMetricFamily("psgd_worker_time_seconds", "Seconds of a worker's step loop, by phase.",
                                  labels=["worker", "phase"])
    share = GaugeMetricFamily("psgd_worker_time_ratio", "Share (0..1) of a worker's wall time, by phase.",
                              labels=["worker", "phase"])
    for name, w in workers.items():
        rate.add_metric([name], float(w.get("examples_per_s") or 0.0))
        pushes.add_metric([name], float(w.get("pushes") or 0))
        refused.add_metric([name], float(w.get("refused") or 0))
        straggler.add_metric([name], 1.0 if w.get("straggler") else 0.0)
        up.add_metric([name], 1.0 if w.get("connected") else 0.0)
        timing, shares = w.get("timing") or {}, w.get("time_shares") or {}
        for phase in TIMING_KEYS[1:]:
            if phase in timing:
                seconds.add_metric([name, phase], float(timing[phase]))
            if phase in shares:
                share.add_metric([name, phase], float(shares[phase]))
    return [rate, pushes, refused, straggler, up, seconds, share]


def registry_for(source) -> CollectorRegistry:
    """A registry of its own (not the library's global one, which would also export this
    process's Python and GC metrics and could hold only one run)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(source))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
