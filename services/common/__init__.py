"""The shared service runtime: bus, event log, projections, inspection, telemetry."""
