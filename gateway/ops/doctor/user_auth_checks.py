"""The doctor's look at the token issuers of tools that act for their user (``user_auth``): each
JWKS URL answers, with keys PyJWT can use. A failure here means every such tool answers 503
``user_auth_unavailable`` until the issuer is back."""

from __future__ import annotations

import httpx
import jwt

from gateway.ops.doctor.findings import Finding, fail, ok

__all__ = ["check_jwks"]


async def check_jwks(url: str, client: httpx.AsyncClient, *, timeout: float = 5.0) -> Finding:
    fix = "check the tool's user_auth.jwks_url and that the issuer is up"
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return fail("jwks", url, "jwks_unreachable", f"the JWKS cannot be fetched ({type(exc).__name__})", fix)
    if response.status_code != 200:
        return fail("jwks", url, "jwks_unreachable", f"the JWKS answered HTTP {response.status_code}", fix)
    try:
        keys = jwt.PyJWKSet.from_dict(response.json())
    except (ValueError, TypeError, KeyError, jwt.PyJWTError):
        return fail("jwks", url, "jwks_invalid", "the answer is not a JWKS with a usable key", fix)
    return ok("jwks", url, f"{len(keys.keys)} signing key(s)")
