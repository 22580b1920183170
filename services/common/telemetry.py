"""OpenTelemetry for every service: a span per handled event, metrics.

Trace context travels in NATS message headers (W3C traceparent), so one trace
follows an event from the service that published it through every service
that handles it. Exporters are off by default; `console` prints spans and
metrics to stderr for debugging.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

EXPORTERS = ("none", "console")


class Telemetry:
    """The tracer and instruments of one service."""

    def __init__(self, service: str, node_id: str, exporter: str) -> None:
        if exporter not in EXPORTERS:
            raise ValueError(
                f"telemetry exporter {exporter!r} is not one of {', '.join(EXPORTERS)}"
            )
        resource = Resource.create({"service.name": f"mesh-{service}", "mesh.node_id": node_id})
        self.tracer_provider = TracerProvider(resource=resource)
        readers = []
        if exporter == "console":
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 10_000))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self.tracer_provider.get_tracer("mesh.runtime")
        meter = self.meter_provider.get_meter("mesh.runtime")
        self.events_handled = meter.create_counter(
            "mesh.events.handled", description="events folded into the projection"
        )
        self.events_rejected = meter.create_counter(
            "mesh.events.rejected", description="malformed or unknown events skipped"
        )
        self.handle_latency = meter.create_histogram(
            "mesh.events.handle_latency", unit="ms", description="time to handle one event"
        )

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to outgoing NATS headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))
