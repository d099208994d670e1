"""The chain: its declared order, a stage answering stops the ones after it, and the finalizers
(the audit record among them) run whatever a stage did."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from starlette.responses import PlainTextResponse, Response

from gateway.errors import GatewayError
from gateway.pipeline.chain import Chain, build_chain
from gateway.pipeline.context import RequestContext
from gateway.pipeline.finalizers import AuditTrailWrite
from gateway.pipeline.stages.challenge import Challenge
from settlement.audit import AuditEvent

STAGES = [
    "route", "header_limits", "body", "arguments", "offer", "pre_challenge_safety", "user_auth", "challenge",
    "reaccess", "decode_and_bind", "wallet_check", "payer_checks", "in_flight", "exactly_once", "payment_window", "verify",
    "linked_account", "reserve", "record", "settle_upfront", "bridge", "meter", "answer", "relay", "settle", "respond",
]
FINALIZERS = ["release_holds", "audit", "observers", "access_log"]


def declared_chain() -> Chain:
    # The stages only keep what they are given; the order is what is under test here.
    services: dict[str, Any] = dict.fromkeys(
        ["router", "tools", "safety", "store", "ledger", "schemes", "signers", "refunds", "bridge", "upstream", "audit"]
    )
    return build_chain(
        **services, observers=[], public_url=None, challenge_body_version=2, max_body_bytes=1024,
        max_upstream_response_bytes=1024, lock_ttl_ms=1000,
    )


def test_the_order_is_declared_once_and_is_this() -> None:
    chain = declared_chain()
    assert chain.names == STAGES
    assert [finalizer.name for finalizer in chain.finalizers] == FINALIZERS


def test_issue_13_order_holds() -> None:
    names = declared_chain().names
    # Offline signer recovery before per-payer limits and before any lookup; the window check
    # only after exactly_once (fresh payments); the per-client limit (pre_challenge_safety) before any 402.
    assert names.index("decode_and_bind") < names.index("payer_checks") < names.index("in_flight")
    assert names.index("in_flight") < names.index("exactly_once") < names.index("payment_window") < names.index("verify")
    assert names.index("pre_challenge_safety") < names.index("challenge")
    # exactly one stage talks to the upstream; only ``meter`` (usage), ``answer`` (drift, trimming)
    # and ``relay`` (a stream, which settles when it ends) sit between it and settle
    assert names.index("bridge") == names.index("meter") - 1 == names.index("answer") - 2 == names.index("settle") - 4
    assert names.index("relay") == names.index("settle") - 1


def test_issue_17_answers_are_checked_before_settlement_and_their_parameters_before_the_402() -> None:
    names = declared_chain().names
    # Trimming parameters are read with the arguments (a malformed projection is a 400 before any
    # offer); the answer is checked for drift after the upstream and before any money moves for it.
    assert names.index("arguments") < names.index("challenge")
    assert names.index("bridge") < names.index("answer") < names.index("settle") < names.index("respond")


def test_issue_18_usage_is_counted_from_the_whole_answer_before_settlement() -> None:
    names = declared_chain().names
    # The units are read from the upstream's own answer (before trimming), and the charge is known
    # before the write-ahead record of the settlement.
    assert names.index("bridge") < names.index("meter") < names.index("answer") < names.index("settle")


def test_issue_19_a_sign_in_is_answered_after_the_402_and_before_any_payment_is_read() -> None:
    names = declared_chain().names
    # Re-access needs what the 402 needs (arguments, offer, the per-client limit, the user's token),
    # and answers before anything reads, locks or records a payment: it has none.
    assert names.index("user_auth") < names.index("challenge") == names.index("reaccess") - 1
    assert names.index("reaccess") < names.index("decode_and_bind") < names.index("reserve")


def test_issue_17_the_user_token_is_checked_behind_the_client_limit_and_before_any_402() -> None:
    names = declared_chain().names
    # The per-client limit stands before any JWKS fetch; no price is shown, no payment read, without
    # a good user token.
    assert names.index("pre_challenge_safety") < names.index("user_auth") == names.index("challenge") - 1


def test_issue_16_a_contract_wallet_is_checked_on_chain_before_anything_keys_on_it() -> None:
    names = declared_chain().names
    # The chain read a contract wallet's signature needs comes after the per-client limit (its
    # cost bound) and before the payer lists and limits, the in-flight lock and the ledger lookup
    # (which would otherwise key on an unverified claim: junk naming a wallet could lock it out).
    assert names.index("pre_challenge_safety") < names.index("decode_and_bind") < names.index("wallet_check")
    assert names.index("wallet_check") < names.index("payer_checks") < names.index("in_flight")
    assert names.index("wallet_check") < names.index("exactly_once")


def test_the_fast_path_halves_of_the_unpaid_prefix() -> None:
    chain = declared_chain()
    assert [s.name for s in chain.shape_stages] == ["route", "body", "arguments", "offer"]
    assert [s.name for s in chain.live_stages] == ["header_limits", "pre_challenge_safety", "user_auth"]


# -- driving a chain of fakes ----------------------------------------------------------------


class Passes:
    shape_only = False

    def __init__(self, name: str, ran: list[str]) -> None:
        self.name = name
        self.ran = ran

    async def __call__(self, ctx: RequestContext) -> Response | None:
        self.ran.append(self.name)
        return None


class Answers(Passes):
    async def __call__(self, ctx: RequestContext) -> Response | None:
        self.ran.append(self.name)
        return PlainTextResponse("answered here", status_code=299)


class Raises(Passes):
    def __init__(self, name: str, ran: list[str], error: Exception) -> None:
        super().__init__(name, ran)
        self.error = error

    async def __call__(self, ctx: RequestContext) -> Response | None:
        self.ran.append(self.name)
        ctx.outcome = "verified"
        raise self.error


class Finalizer:
    def __init__(self, name: str, ran: list[str], fails: bool = False) -> None:
        self.name = name
        self.ran = ran
        self.fails = fails

    async def __call__(self, ctx: RequestContext) -> None:
        self.ran.append(self.name)
        if self.fails:
            raise RuntimeError("a broken finalizer")


class Sink:
    def __init__(self) -> None:
        self.batches: list[Sequence[AuditEvent]] = []

    def submit(self, events: Sequence[AuditEvent]) -> None:
        self.batches.append(events)

    async def close(self) -> None:
        return None


def run(stages: list[Any], ran: list[str], sink: Sink, *, broken_first: bool = False) -> tuple[RequestContext, Response]:
    finalizers = [Finalizer("release_holds", ran, fails=broken_first), AuditTrailWrite(sink), Finalizer("observers", ran)]
    chain = Chain([*stages, Challenge()], cast(Any, finalizers))
    ctx = RequestContext(method="GET", path="/x", query="", client=None, paying=True)  # past the 402
    response = asyncio.run(chain.answer(ctx, chain.run(ctx)))
    return ctx, response


def response_event(sink: Sink) -> AuditEvent:
    [batch] = sink.batches
    return next(event for event in batch if event.event == "response")


def test_a_stage_that_answers_stops_the_chain_and_the_finalizers_still_run() -> None:
    ran: list[str] = []
    sink = Sink()
    ctx, response = run([Passes("one", ran), Answers("two", ran), Passes("three", ran)], ran, sink)
    assert response.status_code == 299 and response.body == b"answered here"
    assert ran == ["one", "two", "release_holds", "observers"]  # "three" never ran
    assert ctx.status == 299
    assert response_event(sink).fields["status"] == 299


def test_a_refusal_is_the_answer_and_is_audited() -> None:
    ran: list[str] = []
    sink = Sink()
    refusal = GatewayError("payer_denied", "no", status=403)
    ctx, response = run([Passes("one", ran), Raises("two", ran, refusal), Passes("three", ran)], ran, sink)
    assert response.status_code == 403
    assert ran == ["one", "two", "release_holds", "observers"]
    assert ctx.reason == "payer_denied"
    event = response_event(sink)
    assert (event.fields["status"], event.fields["reason"]) == (403, "payer_denied")


def test_a_stage_that_breaks_is_a_500_naming_only_the_request_and_is_audited() -> None:
    ran: list[str] = []
    sink = Sink()
    ctx, response = run([Raises("one", ran, RuntimeError("secret internals")), Passes("two", ran)], ran, sink)
    assert response.status_code == 500
    assert b"secret internals" not in response.body and ctx.request_id.encode() in response.body
    assert ran == ["one", "release_holds", "observers"]
    assert response_event(sink).fields["reason"] == "internal_error"


def test_a_broken_finalizer_does_not_stop_the_ones_after_it() -> None:
    ran: list[str] = []
    sink = Sink()
    _, response = run([Answers("one", ran)], ran, sink, broken_first=True)
    assert response.status_code == 299
    assert ran == ["one", "release_holds", "observers"] and len(sink.batches) == 1
