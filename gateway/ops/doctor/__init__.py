"""``x402gw doctor``: is this configuration ready to take payments? Each check is a finding with a
stable code, a one-line message and the fix (``findings``); the plan is read from the settings and
catalogs (``plan``); the checks read the chains (``chain_checks``), the facilitators
(``facilitator_checks``), the database, store, admin token and keys (``service_checks``); ``run``
runs them all. The command is ``gateway.cli.doctor``; ``/readyz?detail=1`` serves the same report.

    findings.py            Finding, Report (text, JSON, exit status 0 / 1 failures / 2 warnings only)
    plan.py                DoctorPlan, NetworkPlan, Offer, plan_from_settings, facilitator_headers
    rpc.py                 RpcReader: the few JSON-RPC reads the checks need
    chain_checks.py        chain id, token EIP-712 name/version and decimals, settlement gas
    facilitator_checks.py  /supported covers the routes, credentials accepted
    service_checks.py      database at head, store, admin token, dev keys off the local chain
    run.py                 run_doctor
"""

from gateway.ops.doctor.chain_checks import GAS_PER_SETTLEMENT, GasThresholds
from gateway.ops.doctor.findings import EXIT_FAILURES, EXIT_OK, EXIT_WARNINGS, Finding, Report, redact_url
from gateway.ops.doctor.plan import DoctorPlan, HeadersFor, NetworkPlan, Offer, facilitator_headers, plan_from_settings
from gateway.ops.doctor.run import run_doctor

__all__ = [
    "EXIT_FAILURES",
    "EXIT_OK",
    "EXIT_WARNINGS",
    "GAS_PER_SETTLEMENT",
    "DoctorPlan",
    "Finding",
    "GasThresholds",
    "HeadersFor",
    "NetworkPlan",
    "Offer",
    "Report",
    "facilitator_headers",
    "plan_from_settings",
    "redact_url",
    "run_doctor",
]
