"""The operations room: what an operator reads and runs, beside the paid path.

    admin/      the dashboard: ``GET /admin`` and ``/admin/data.json`` behind the admin token
    health.py   ``/healthz`` and ``/readyz`` (``Readiness`` over the gateway's dependencies)
    metrics.py  ``GatewayMetrics``: Prometheus counters and latencies of this process
    serving.py  ``ThreadServer``: a uvicorn server on a thread (tests, demo, devkit upstreams)
"""

from gateway.ops.admin import Dashboard, admin_routes
from gateway.ops.health import CheckFailed, Readiness, gateway_checks, healthz
from gateway.ops.metrics import GatewayMetrics, ToolCounts
from gateway.ops.serving import ThreadServer

__all__ = [
    "CheckFailed",
    "Dashboard",
    "GatewayMetrics",
    "Readiness",
    "ThreadServer",
    "ToolCounts",
    "admin_routes",
    "gateway_checks",
    "healthz",
]
