"""Stage ``user_auth``: a tool that acts for its end user checks the user's OAuth 2.0 access token
before any price is shown (``gateway.upstream.user_auth``).

After ``pre_challenge_safety`` (so the per-client rate limit stands before any JWKS fetch) and
before ``challenge``: a request without a good token never sees a 402, never reaches the ledger
or the upstream. Writes ``ctx.user``; ``decode_and_bind`` binds its issuer and subject into the
payment's request fingerprint, so a stored answer is replayed only to the same user. Runs on every
request (the fast path included): it reads a header the fast path does not key on. Stops with 401
or 403 (``WWW-Authenticate: Bearer``), or 503 when the issuer's keys cannot be read.
"""

from __future__ import annotations

from starlette.responses import Response

from gateway.headers import AUTHORIZATION
from gateway.pipeline.context import RequestContext
from gateway.upstream.user_auth import UserAuthority

__all__ = ["LinkedAccountStage", "UserAuthStage"]

_AUTHORIZATION = AUTHORIZATION.lower().encode()


class UserAuthStage:
    name = "user_auth"
    shape_only = False

    def __init__(self, users: UserAuthority) -> None:
        self.users = users

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool = ctx.tool
        assert tool is not None
        if tool.user_auth is None:
            return None
        header = next((value.decode("latin-1") for name, value in ctx.raw_headers if name.lower() == _AUTHORIZATION), None)
        try:
            ctx.user = await self.users.verify(tool.user_auth, header)
        except Exception as exc:
            ctx.record("user_token_refused", code=getattr(exc, "code", "internal_error"))
            raise
        ctx.record("user_authenticated", issuer=ctx.user.issuer, subject=ctx.user.subject, tokenDigest=ctx.user.digest)
        return None


class LinkedAccountStage:
    """Stage ``linked_account``: a ``wallet_accounts`` tool needs an account linked to the payer that
    ``verify`` confirmed. Before ``reserve`` and ``record``: an unlinked payer gets 403
    ``wallet_not_linked`` with no budget spent, no ledger row, nothing settled (upfront tools
    included) and no upstream call."""

    name = "linked_account"
    shape_only = False

    def __init__(self, users: UserAuthority) -> None:
        self.users = users

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool = ctx.tool
        assert tool is not None
        if tool.wallet_accounts is not None:
            self.users.linked_account(tool, ctx.payer)
        return None
