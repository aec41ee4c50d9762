"""Prometheus metrics of one hub: counters fed by the core and transport, gauges read at scrape.

Each hub has its own :class:`~prometheus_client.CollectorRegistry` (several
hubs can live in one process, as in the tests); ``GET /metrics`` on the admin
port renders it. Counters that need a hook are incremented by cheap one-line
calls on the hot paths, through labelled children cached here so that no
label lookup happens per frame or per command. Everything that is a level
rather than an event (connected agents, queue depths, store and cluster counters) is read
from the hub when Prometheus scrapes, so it costs nothing in between.
The hub's own names start with ``dispatcher_``; ``docs/admin-api.md`` lists them.
The registry also carries prometheus_client's standard collectors: ``process_*``
(CPU, memory, open files) and ``python_*`` (interpreter, garbage collector).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .models import TERMINAL_OUTCOMES, CommandInfo

__all__ = ["COMMAND_BUCKETS", "STORE_BUCKETS", "Levels", "Metrics"]

# Submit to terminal: from a millisecond echo to the default 60 s timeout and beyond.
COMMAND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
# One pipelined Redis round trip: sub-millisecond on loopback, seconds when it struggles.
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0)

# Frames the hub sends (docs/protocol.md, Frames); anything else is counted as "other".
_HUB_FRAME_TYPES = ("welcome", "cmd", "cancel", "event", "reply", "error")
# Frames agents send, plus "invalid" for messages that do not decode.
_AGENT_FRAME_TYPES = ("hello", "ack", "progress", "result", "fail", "received", "emit",
                      "sub", "unsub", "call", "invalid")
_FIXMAP_T = b"\xa1t"  # msgpack: the fixstr "t", the first key of every encoded frame


@dataclass(slots=True)
class Levels:
    """What the hub reports at scrape time (levels, not events)."""

    hub_id: str
    engine: str
    agents_connected: int
    store_up: bool
    commands_waiting: int
    events_awaiting_receipt: int
    events_dropped: dict[str, int]  # by reason: queue_full, expired, evicted, ...
    calls_in_flight: int
    send_buffer_bytes: int
    store_queue_depth: int | None  # None: the engine has no write queue
    store_counters: dict[str, int]  # round_trips, operations, errors, outages
    cluster_sent: int | None  # None: the hub is alone
    cluster_received: int | None
    bus_deaf: bool | None = None  # None: the hub is alone


class Metrics:
    """The metrics of one hub; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The standard ones every Prometheus user expects (process_*, python_*).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.connections_opened = Counter(
            "dispatcher_connections_opened", "Agent connections that completed the handshake.",
            registry=r)
        self.connections_closed = Counter(
            "dispatcher_connections_closed",
            "Agent connections that ended, by reason (closed, going_away, connection_lost, "
            "heartbeat_timeout, replaced, policy_violation, frame_too_large, close_N).",
            ["reason"], registry=r)
        self.connections_refused = Counter(
            "dispatcher_connections_refused",
            "Handshakes the hub refused, by error code (bad_hello, unauthorized, ...).",
            ["code"], registry=r)
        # The per-frame and per-command figures are plain integers, turned into
        # Prometheus families only when scraped (HotCollector): prometheus-client's
        # locked inc()/observe() cost ~3.5 us per command on the hot path.
        self.frames_in: dict[str, int] = dict.fromkeys(_AGENT_FRAME_TYPES, 0)
        self.frames_out: dict[str, int] = dict.fromkeys((*_HUB_FRAME_TYPES, "other"), 0)
        self.commands_submitted = 0
        self.commands: dict[str, int] = dict.fromkeys(TERMINAL_OUTCOMES, 0)
        # outcome -> [bucket counts..., +Inf count], and the sums of seconds
        self._duration: dict[str, list[int]] = {
            o: [0] * (len(COMMAND_BUCKETS) + 1) for o in TERMINAL_OUTCOMES}
        self._duration_sum: dict[str, float] = dict.fromkeys(TERMINAL_OUTCOMES, 0.0)
        self.store_round_trip = Histogram(
            "dispatcher_store_round_trip_seconds",
            "Latency of one pipelined write to the store and its replies (Redis engine).",
            buckets=STORE_BUCKETS, registry=r)
        self.admin_requests = Counter(
            "dispatcher_admin_requests", "Admin API requests, by route, method and status.",
            ["route", "method", "status"], registry=r)
        self.streams_dropped = Counter(
            "dispatcher_streams_dropped",
            "Admin event streams (SSE) closed because their reader fell too far behind.",
            registry=r)
        self._out_names = {t.encode(): t for t in _HUB_FRAME_TYPES}
        self._closed: dict[str, Counter] = {}
        self._store_bound = False
        r.register(HotCollector(self))

    def watch(self, levels: Callable[[], Levels], store: Any) -> None:
        """Read the hub's levels at every scrape; time the store's round trips."""
        self.bind_store(store)
        self.registry.register(HubCollector(levels))

    # -- hooks on the hot paths ------------------------------------------------------
    def frame_in(self, frame_type: str) -> None:
        counts = self.frames_in
        counts[frame_type] = counts.get(frame_type, 0) + 1

    def frame_out(self, data: bytes) -> None:
        """Count one encoded frame by type without decoding it.

        ``to_wire()`` puts ``t`` first and every frame is a small msgpack map,
        so the type is the fixstr at byte 3: ``<fixmap> a1 't' <a0|n> TYPE``.
        """
        self.frame_out_many(data, 1)

    def frame_out_many(self, data: bytes, n: int) -> None:
        """The same frame sent to ``n`` connections (fan-out)."""
        name = "other"
        if data[1:3] == _FIXMAP_T and len(data) > 4:
            name = self._out_names.get(data[4:4 + (data[3] & 0x1F)], "other")
        self.frames_out[name] += n

    def command_completed(self, info: CommandInfo) -> None:
        """A command reached COMPLETE here: count its outcome, observe submit→terminal."""
        outcome = info.outcome or ""
        buckets = self._duration.get(outcome)
        if buckets is not None:
            self.commands[outcome] += 1
            seconds = max(0, info.updated - info.ts) / 1000
            buckets[bisect_left(COMMAND_BUCKETS, seconds)] += 1
            self._duration_sum[outcome] += seconds

    def stream_dropped(self) -> None:
        self.streams_dropped.inc()

    def connection_opened(self) -> None:
        self.connections_opened.inc()

    def connection_closed(self, reason: str) -> None:
        child = self._closed.get(reason)
        if child is None:
            child = self._closed[reason] = self.connections_closed.labels(reason)
        child.inc()

    def connection_refused(self, code: str) -> None:
        self.connections_refused.labels(code).inc()

    def admin_request(self, route: str, method: str, status: int) -> None:
        self.admin_requests.labels(route, method, str(status)).inc()

    def bind_store(self, store: Any) -> None:
        """Let an engine that times its round trips report them (``on_round_trip``)."""
        if hasattr(store, "on_round_trip") and not self._store_bound:
            store.on_round_trip = self.store_round_trip.observe
            self._store_bound = True

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this hub."""
        return generate_latest(self.registry)


class HotCollector(Collector):
    """The hot-path integers of :class:`Metrics` as Prometheus families."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        m = self.m
        fin = CounterMetricFamily("dispatcher_frames_in", "Frames received from agents, by "
                                  "type ('invalid': did not decode).", labels=["type"])
        for name, value in list(m.frames_in.items()):
            fin.add_metric([name], value)
        yield fin
        fout = CounterMetricFamily("dispatcher_frames_out", "Frames sent to agents, by type.",
                                   labels=["type"])
        for name, value in m.frames_out.items():
            fout.add_metric([name], value)
        yield fout
        yield CounterMetricFamily("dispatcher_commands_submitted", "Commands stored by this hub "
                                  "(idempotent resubmits not counted).",
                                  value=m.commands_submitted)
        done = CounterMetricFamily("dispatcher_commands", "Commands completed by this hub, by "
                                   "outcome.", labels=["outcome"])
        for outcome, value in sorted(m.commands.items()):
            done.add_metric([outcome], value)
        yield done
        hist = HistogramMetricFamily("dispatcher_command_duration_seconds",
                                     "Command latency from submit to terminal state, by "
                                     "outcome.", labels=["outcome"])
        for outcome, counts in sorted(m._duration.items()):
            cumulative, total = [], 0
            for bound, count in zip((*COMMAND_BUCKETS, float("inf")), counts, strict=True):
                total += count
                cumulative.append((_bound(bound), total))
            hist.add_metric([outcome], cumulative, m._duration_sum[outcome])
        yield hist


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class HubCollector(Collector):
    """Levels read from the hub at scrape time: agents, queue depths, store counters."""

    def __init__(self, levels: Callable[[], Levels]) -> None:
        self.levels = levels

    def describe(self) -> Iterable[Metric]:
        return ()  # names are only known by collecting; nothing to check at register time

    def collect(self) -> Iterable[Metric]:
        lv = self.levels()
        info = GaugeMetricFamily("dispatcher_hub_info", "This hub's id and store engine.",
                                 labels=["hub_id", "engine"])
        info.add_metric([lv.hub_id, lv.engine], 1)
        yield info
        yield GaugeMetricFamily("dispatcher_agents_connected",
                                "Agents connected to this hub.", value=lv.agents_connected)
        yield GaugeMetricFamily("dispatcher_store_up",
                                "1 while the store answers, 0 during an outage.",
                                value=1 if lv.store_up else 0)
        # Queue depths (docs/benchmarks.md): what waits in this hub, by stage.
        yield GaugeMetricFamily("dispatcher_commands_waiting",
                                "Commands submitted here whose caller still waits for them.",
                                value=lv.commands_waiting)
        yield GaugeMetricFamily("dispatcher_events_awaiting_receipt",
                                "Events sent by emit_to still waiting for a 'received'.",
                                value=lv.events_awaiting_receipt)
        dropped = CounterMetricFamily(
            "dispatcher_events_dropped",
            "Frames for agents (events, call replies) never delivered, by reason: queue_full "
            "(the agent's queue was full), expired (older than event_queue_ttl), evicted "
            "(dropped, oldest first, to keep all queues within max_offline_queues / "
            "max_offline_bytes), store_unavailable.", labels=["reason"])
        for reason, count in sorted(lv.events_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily("dispatcher_calls_in_flight",
                                "Routed agent-to-agent calls waiting for their target.",
                                value=lv.calls_in_flight)
        yield GaugeMetricFamily("dispatcher_send_buffer_bytes",
                                "Bytes written to agents' connections, not yet sent.",
                                value=lv.send_buffer_bytes)
        if lv.store_queue_depth is not None:
            yield GaugeMetricFamily("dispatcher_store_queue_depth",
                                    "Store operations waiting for the next pipelined write.",
                                    value=lv.store_queue_depth)
        for attr, name, doc in (
            ("round_trips", "dispatcher_store_round_trips", "Pipelined writes to the store."),
            ("operations", "dispatcher_store_operations", "Operations sent to the store."),
            ("errors", "dispatcher_store_errors", "Store operations that failed "
             "(StoreUnavailable: unreachable, or an error reply)."),
            ("outages", "dispatcher_store_outages", "Times the store became unreachable."),
        ):
            yield CounterMetricFamily(name, doc, value=lv.store_counters.get(attr, 0))
        if lv.cluster_sent is not None:
            messages = CounterMetricFamily(
                "dispatcher_cluster_messages", "Messages on the hubs' pub/sub channels, by "
                "direction: out (published by this hub), in (received).", labels=["direction"])
            messages.add_metric(["out"], lv.cluster_sent)
            messages.add_metric(["in"], lv.cluster_received or 0)
            yield messages
        if lv.bus_deaf is not None:
            yield GaugeMetricFamily("dispatcher_bus_deaf",
                                    "1 while this hub's pub/sub listener is not known to "
                                    "deliver (its loopback probes are late).",
                                    value=int(lv.bus_deaf))
