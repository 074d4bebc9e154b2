"""
Telemetry: OpenTelemetry traces (L{rproxy.telemetry.setup}, L{rproxy.telemetry.spans}, L{rproxy.telemetry.traceparent}).
"""
