"""The safety room: what may be sold to whom, checked around the paid path.

    checks.py   ``Safety``: header size, kill switches, price ceiling, payer lists, rate limits,
                budgets (reserved, released in the finalizer) and the breaker, and ``Limits``
    policy.py   ``Policy``: payer allow/deny lists and kill switches (file + admin overrides)
    breaker.py  ``Breakers``: one circuit breaker per upstream, shared through the store
"""

from gateway.safety.breaker import Breakers, Ticket, upstream_key
from gateway.safety.checks import Limits, Safety
from gateway.safety.policy import Policy, PolicyView, parse_policy, policy_routes

__all__ = [
    "Breakers",
    "Limits",
    "Policy",
    "PolicyView",
    "Safety",
    "Ticket",
    "parse_policy",
    "policy_routes",
    "upstream_key",
]
