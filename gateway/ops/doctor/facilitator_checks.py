"""Checks of each network's facilitators. A local one is this gateway (its gas is checked with the
chain). A remote one must answer ``GET /supported`` listing, for x402 v2, every scheme the
catalog's routes use on that network, and must accept our credentials: its ``/supported`` and a
deliberately empty ``POST /verify`` (harmless: it verifies nothing) must not answer 401 or 403.

Codes: ``facilitator_credentials_invalid`` (the configured credentials cannot be used),
``facilitator_unreachable``, ``facilitator_unauthorized``, ``facilitator_bad_answer``,
``facilitator_unsupported``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.ops.doctor.findings import Finding, fail, ok, redact_url
from gateway.ops.doctor.plan import HeadersFor, NetworkPlan

__all__ = ["check_facilitator"]

CREDENTIALS_FIX = (
    "set this facilitator's credentials in X402GW_FACILITATOR_AUTH, keyed by its URL as X402GW_FACILITATORS "
    "names it ({{\"https://...\": {{\"Authorization\": \"Bearer ...\"}}}} or \"cdp\" with CDP_API_KEY_ID and "
    "CDP_API_KEY_SECRET), and check they are valid for {url} and not revoked"
)


async def _request(client: httpx.AsyncClient, method: str, url: str, headers_for: HeadersFor, timeout: float) -> httpx.Response:
    async with asyncio.timeout(timeout):
        body: Any = {"x402Version": 2} if method == "POST" else None
        return await client.request(method, url, headers=dict(headers_for(method, url)), json=body)


def _refused(response: httpx.Response) -> bool:
    return response.status_code in (401, 403)


async def check_facilitator(
    plan: NetworkPlan, url: str, client: httpx.AsyncClient, headers_for: HeadersFor, *, timeout: float = 5.0
) -> Finding:
    where = redact_url(url, keep_path=False)  # as the gateway's logs name it: paths may hold keys
    subject = f"{plan.network} {where}"
    if url == "local":
        return ok("facilitator", plan.network, "settled by this gateway (local facilitator); its gas is checked below")
    base = url.rstrip("/")
    try:
        headers_for("GET", f"{base}/supported")
    except ValueError as exc:  # unusable credentials: the message names the setting, never the secret
        return fail("facilitator", subject, "facilitator_credentials_invalid", str(exc),
                    "fix X402GW_FACILITATOR_AUTH (an object of headers or \"cdp\" per facilitator URL) or "
                    "CDP_API_KEY_ID / CDP_API_KEY_SECRET")
    try:
        supported = await _request(client, "GET", f"{base}/supported", headers_for, timeout)
        if _refused(supported):
            return fail("facilitator", subject, "facilitator_unauthorized",
                        f"{where} refused our credentials: GET /supported answered {supported.status_code}",
                        CREDENTIALS_FIX.format(url=where))
        verify = await _request(client, "POST", f"{base}/verify", headers_for, timeout)
    except (httpx.HTTPError, TimeoutError) as exc:
        return fail("facilitator", subject, "facilitator_unreachable", f"{where} did not answer: {type(exc).__name__}",
                    "check the facilitator's URL (X402GW_FACILITATORS / X402_FACILITATOR_URL) and that it is reachable from here")
    if _refused(verify):
        return fail("facilitator", subject, "facilitator_unauthorized",
                    f"{where} refused our credentials: POST /verify answered {verify.status_code}",
                    CREDENTIALS_FIX.format(url=where))
    try:
        data = supported.json()
    except ValueError:
        data = None
    kinds = data.get("kinds") if isinstance(data, dict) else None
    if supported.status_code != 200 or not isinstance(kinds, list):
        return fail("facilitator", subject, "facilitator_bad_answer",
                    f"{where} answered GET /supported with HTTP {supported.status_code} and no usable kinds list",
                    "check the URL names an x402 facilitator (its /supported lists kinds), not a page or a proxy in front of it")
    served = {(k.get("scheme"), k.get("network")) for k in kinds if isinstance(k, dict) and k.get("x402Version") == 2}
    missing = [scheme for scheme in plan.schemes if (scheme, plan.network) not in served]
    if missing:
        offered = sorted(f"{s} on {n}" for s, n in served if isinstance(s, str) and isinstance(n, str))
        return fail("facilitator", subject, "facilitator_unsupported",
                    f"{where} does not support {', '.join(missing)} on {plan.network} (x402 v2); it offers: "
                    f"{', '.join(offered[:8]) or 'nothing'}",
                    f"choose a facilitator that settles {plan.network} (X402GW_FACILITATORS), or settle it locally "
                    "with a funded X402GW_SETTLEMENT_KEY")
    return ok("facilitator", subject, f"supports {', '.join(plan.schemes)} on {plan.network}, accepts our credentials")
