"""The operations room: what an operator reads and runs, beside the paid path.

    admin/      the dashboard: ``GET /admin`` and ``/admin/data.json`` behind the admin token
    doctor/     ``x402gw doctor``'s checks: each failure a stable code, a message and its fix
    health.py   ``/healthz`` and ``/readyz`` (``Readiness`` over the gateway's dependencies;
                ``?detail=1`` adds the doctor's report, ``doctor_detail``)
    metrics.py  ``GatewayMetrics``: Prometheus counters and latencies of this process
    serving.py  ``ThreadServer``: a uvicorn server on a thread (tests, demo, devkit upstreams)
"""

from gateway.ops.admin import Dashboard, admin_routes
from gateway.ops.health import CheckFailed, Readiness, doctor_detail, gateway_checks, healthz
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
    "doctor_detail",
    "gateway_checks",
    "healthz",
]
