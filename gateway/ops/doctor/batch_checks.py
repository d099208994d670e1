"""The BatchSettlers of a batched network (``X402GW_BATCH_SETTLEMENT``): each listed contract
answers ``settler()``, and the settlement account is one of theirs.

A BatchSettler takes ``settle`` from its one ``settler``; the gateway picks, at start-up, the
listed contract naming its account (``settlement.schemes.batch_settlers``) and refuses to start
without one. This check says so before a deploy. With one contract (one process) it must name the
settlement key's account; with several (one per ``serve --workers`` worker, whose keys come from
``--settlement-keys-file``) each is reported with its settler, and one naming neither the key of
this environment nor any listed account is only a warning.

Codes: ``batch_settler_missing``, ``batch_settler_invalid``, ``batch_settler_not_ours`` (fail);
``batch_settler_not_this_key`` (warn).
"""

from __future__ import annotations

from eth_account import Account

from gateway.ops.doctor.findings import Finding, fail, ok, warn
from gateway.ops.doctor.plan import NetworkPlan
from gateway.ops.doctor.rpc import RpcProblem, RpcReader
from settlement.schemes.batch_settlers import SEL_SETTLER, settler_in

__all__ = ["check_batch_settlers"]

_DEPLOY = ("deploy contracts/BatchSettler.sol with the settlement account as its constructor's settler and "
           "list it in X402GW_BATCH_SETTLEMENT's \"contract\" (one per worker: \"contracts\")")


async def _settler(rpc: RpcReader, contract: str) -> str | None:
    try:
        return settler_in(await rpc.eth_call(contract, SEL_SETTLER))
    except RpcProblem:
        return None


async def check_batch_settlers(plan: NetworkPlan, rpc: RpcReader) -> list[Finding]:
    if not plan.batched:
        return []
    if not plan.batch_settlers:
        return [fail("batch_settler", plan.network, "batch_settler_missing",
                     f"batched settlement on {plan.network} names no BatchSettler contract", _DEPLOY)]
    try:
        account = Account.from_key(plan.settlement_key).address if plan.settlement_key else None
    except Exception:  # noqa: BLE001 -- a malformed key is check_gas's finding; never echoed
        account = None
    found: list[Finding] = []
    named: dict[str, str] = {}
    for contract in plan.batch_settlers:
        settler = await _settler(rpc, contract)
        if settler is None:
            found.append(fail("batch_settler", plan.network, "batch_settler_invalid",
                              f"{contract} is not a BatchSettler (settler() did not answer an address)", _DEPLOY))
        else:
            named[contract] = settler
    if not named or account is None:
        return found + [ok("batch_settler", plan.network, f"{c} takes settlements from {s}") for c, s in named.items()]
    ours = [c for c, s in named.items() if s.lower() == account.lower()]
    if ours:
        return found + [ok("batch_settler", plan.network, f"{ours[0]} takes settlements from the settlement account {account}")]
    facts = "; ".join(f"{c} takes {s}" for c, s in named.items())
    if len(plan.batch_settlers) == 1:
        return found + [fail("batch_settler", plan.network, "batch_settler_not_ours",
                             f"the BatchSettler does not take settlements from the settlement account {account} ({facts}): "
                             "every batch would revert; the gateway refuses to start", _DEPLOY)]
    return found + [warn("batch_settler", plan.network, "batch_settler_not_this_key",
                         f"no listed BatchSettler takes settlements from {account} ({facts})",
                         "with serve --workers each worker's key (--settlement-keys-file) must be one of these "
                         "settlers; a single process needs one naming its own account")]
