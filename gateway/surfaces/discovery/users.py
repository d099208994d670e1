"""What discovery says of a tool that acts for its end user (``user_auth``): which token to send.

The same facts everywhere: /tools (``userAuth``), OpenAPI (a bearer security scheme per tool,
required beside ``x402``, with the scopes), MCP (the description and ``_meta``).
"""

from __future__ import annotations

from typing import Any

from catalog import Tool

__all__ = ["security_scheme", "scheme_name", "user_auth_facts", "user_auth_sentence"]


def user_auth_facts(tool: Tool) -> dict[str, Any] | None:
    auth = tool.user_auth
    if auth is None:
        return None
    return {
        "type": "oauth2-bearer", "header": "Authorization: Bearer <access token>", "issuer": auth.issuer,
        "audience": auth.audience, "scopes": list(auth.scopes), "algorithms": list(auth.algorithms),
        "checkedBefore": "payment",  # a missing or bad token is a 401/403, never a 402
    }


def user_auth_sentence(tool: Tool) -> str:
    auth = tool.user_auth
    if auth is None:
        return ""
    scopes = f" with scope(s) {' '.join(auth.scopes)}" if auth.scopes else ""
    return (f" (acts for its user: send Authorization: Bearer <an access token from {auth.issuer} for audience "
            f"{auth.audience}{scopes}>; checked before the price)")


def scheme_name(tool: Tool) -> str:
    return f"user_{tool.name}"


def security_scheme(tool: Tool) -> dict[str, Any]:
    auth = tool.user_auth
    assert auth is not None
    return {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": f"The end user's OAuth 2.0 access token from {auth.issuer} for audience {auth.audience}"
                       + (f", scopes {' '.join(auth.scopes)}" if auth.scopes else "") + "; checked before the 402.",
    }
