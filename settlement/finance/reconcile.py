"""Reconcile the ledger with the chain over a block range, for each payTo (``x402gw reconcile``).

1. Open rows (``settling``, ``pending``) are resolved first (``settlement.ledger.resolve``).
2. For every (network, token) the token's ``Transfer`` logs to the payTo addresses and its
   ``AuthorizationUsed`` logs are read with ``eth_getLogs`` in chunks (halved when a node refuses
   a range). A transfer is an EIP-3009 payment when the same transaction logged
   ``AuthorizationUsed(from, nonce)`` just before it (FiatToken's order); the pair
   (payer, nonce) is the payment's identity on both sides.
3. Disagreements, each a list in the report:

   missing_on_chain    settled in the ledger, no EIP-3009 transfer to payTo for its authorization
                       (a row settled through Permit2, upto or exact: no Transfer from its payer to
                       payTo in its own settlement transaction)
   missing_in_ledger   an EIP-3009 transfer to payTo whose authorization the ledger does not know
   amount_mismatch     both know it, the amounts differ
   state_mismatch      the chain moved the money, the ledger says it did not (failed, voided, ...)
   still_open          rows the chain could not resolve yet (pending)
   duplicate_in_ledger a second settled row naming an authorization (payer and nonce, compared
                       case-insensitively) another row's transfer already paid: each transfer backs
                       one row (an insider's copy would double the revenue of one payment)
   payee_mismatch      the transfer paid another payTo than the row says
   transaction_mismatch the row names another transaction (or block) than the one that moved it
   refund_unpaid       a refund the ledger records paid (refunded_at) whose transaction did not move
                       it to the payer (``owed_refunds.refund_status`` is not ``landed``): a debt
                       hidden by an edit; rows whose settlement block is in the range

The ledger side is the settled rows whose block is in the range; plain ERC-20 transfers to payTo
(not EIP-3009) are counted, not reported: they are not x402 payments.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog.pricing import format_amount
from settlement.chain.client import TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER, RpcError
from settlement.chain.receipts import address_topic
from settlement.finance.reconcile_channels import is_channel_row, match_channel_claims
from settlement.finance.reconcile_refunds import in_blocks, refunds_not_landed
from settlement.ledger import OPEN_STATES, Ledger, Payment, PaymentState
from settlement.ledger.resolve import Resolution, Resolver, resolve_open_payments
from settlement.schemes import Schemes, exact_resolvers
from settlement.schemes.exact_permit2_payload import moved_by_permit2

DEFAULT_CHUNK_BLOCKS = 5_000
MIN_CHUNK_BLOCKS = 1


class LogReader(Protocol):
    """What reconcile needs from a chain besides ``Chain`` (``JsonRpcChain`` has both)."""

    async def block_number(self) -> int: ...

    async def get_logs(
        self, address: str, topics: list[str | list[str] | None], from_block: int, to_block: int
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class ChainTransfer:
    network: str
    asset: str
    tx_hash: str
    log_index: int
    block_number: int
    payer: str
    pay_to: str
    amount: int
    nonce: str | None  # set when the transfer used an EIP-3009 authorization


# The report's lists of disagreements (the module's docstring): any one non-empty, the books disagree.
DISAGREEMENTS = ("missing_on_chain", "missing_in_ledger", "amount_mismatch", "state_mismatch", "still_open",
                 "duplicate_in_ledger", "payee_mismatch", "transaction_mismatch", "refund_unpaid")


@dataclass(slots=True)
class Report:
    ranges: dict[str, dict[str, int]] = field(default_factory=dict)  # network -> {from_block, to_block}
    pay_to: list[str] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)
    ledger_settled: int = 0
    chain_payments: int = 0
    chain_other_transfers: int = 0
    matched: int = 0
    missing_on_chain: list[dict[str, Any]] = field(default_factory=list)
    missing_in_ledger: list[dict[str, Any]] = field(default_factory=list)
    amount_mismatch: list[dict[str, Any]] = field(default_factory=list)
    state_mismatch: list[dict[str, Any]] = field(default_factory=list)
    still_open: list[dict[str, Any]] = field(default_factory=list)
    duplicate_in_ledger: list[dict[str, Any]] = field(default_factory=list)
    payee_mismatch: list[dict[str, Any]] = field(default_factory=list)
    transaction_mismatch: list[dict[str, Any]] = field(default_factory=list)
    refund_unpaid: list[dict[str, Any]] = field(default_factory=list)
    unchecked_networks: list[str] = field(default_factory=list)
    channel_claims: list[dict[str, Any]] = field(default_factory=list)  # batch-settlement claims and their calls

    @property
    def agree(self) -> bool:
        return not any(getattr(self, kind) for kind in DISAGREEMENTS)

    def to_json(self) -> dict[str, Any]:
        return {"agree": self.agree, **asdict(self)}


def _address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


async def read_logs(chain: LogReader, token: str, topics: list[str | list[str] | None], start: int, end: int,
                    chunk: int = DEFAULT_CHUNK_BLOCKS) -> list[dict[str, Any]]:
    """All logs in [start, end], ``chunk`` blocks per call; a refused range is split in two."""
    logs: list[dict[str, Any]] = []
    low = start
    while low <= end:
        high = min(end, low + chunk - 1)
        try:
            logs.extend(await chain.get_logs(token, topics, low, high))
        except RpcError:
            if high == low or chunk <= MIN_CHUNK_BLOCKS:
                raise
            chunk = max(MIN_CHUNK_BLOCKS, chunk // 2)  # "range too large" / "too many results"
            continue
        low = high + 1
    return logs


async def chain_transfers(chain: LogReader, network: str, token: str, pay_to: Iterable[str], start: int, end: int,
                          chunk: int = DEFAULT_CHUNK_BLOCKS) -> list[ChainTransfer]:
    """Transfers of ``token`` to any of ``pay_to`` in [start, end], each with its authorization nonce."""
    targets = sorted({address_topic(a) for a in pay_to})
    if not targets:
        return []
    transfers = await read_logs(chain, token, ["0x" + TOPIC_TRANSFER.hex(), None, targets], start, end, chunk)
    if not transfers:
        return []
    used = await read_logs(chain, token, ["0x" + TOPIC_AUTHORIZATION_USED.hex()], start, end, chunk)
    by_tx: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for log in used:
        by_tx[log["transactionHash"].lower()].append(log)
    result: list[ChainTransfer] = []
    for log in transfers:
        tx = log["transactionHash"].lower()
        index = int(log["logIndex"], 16)
        payer = _address(log["topics"][1])
        # The AuthorizationUsed of this payer logged closest before this Transfer, in this tx.
        nonce: str | None = None
        best = -1
        for auth in by_tx.get(tx, []):
            auth_index = int(auth["logIndex"], 16)
            if _address(auth["topics"][1]) == payer and best < auth_index < index:
                best, nonce = auth_index, auth["topics"][2].lower()
        result.append(ChainTransfer(
            network=network, asset=token, tx_hash=tx, log_index=index, block_number=int(log["blockNumber"], 16),
            payer=payer, pay_to=_address(log["topics"][2]), amount=int(log["data"][2:66] or "0", 16), nonce=nonce,
        ))
    return result


def _row_json(row: Payment) -> dict[str, Any]:
    return {
        "payment_id": row.id, "request_id": row.request_id, "network": row.network, "asset": row.asset,
        "payer": row.payer, "pay_to": row.pay_to, "nonce": row.nonce, "state": row.state,
        "amount_atomic": str(row.amount), "amount": format_amount(row.amount, row.decimals),
        "tx_hash": row.tx_hash, "block_number": row.block_number,
    }


def _transfer_json(t: ChainTransfer) -> dict[str, Any]:
    return {
        "network": t.network, "asset": t.asset, "tx_hash": t.tx_hash, "log_index": t.log_index,
        "block_number": t.block_number, "payer": t.payer, "pay_to": t.pay_to, "nonce": t.nonce,
        "amount_atomic": str(t.amount),
    }


def _ledger_targets(ledger: Ledger, pay_to: set[str]) -> set[tuple[str, str, str]]:
    """(network, asset, pay_to) triples the ledger has payments for."""
    query = select(Payment.network, Payment.asset, Payment.pay_to).distinct()
    with ledger.engine.connect() as conn:
        triples = {(n, a.lower(), p.lower()) for n, a, p in conn.execute(query)}
    return {t for t in triples if not pay_to or t[2] in pay_to}


def _settled_in_range(ledger: Ledger, network: str, asset: str, pay_to: set[str], start: int, end: int,
                      whole_chain: bool) -> list[Payment]:
    query = select(Payment).where(
        Payment.network == network, Payment.state == PaymentState.SETTLED.value, in_blocks(start, end, whole_chain),
        func.lower(Payment.asset) == asset, func.lower(Payment.pay_to).in_(sorted(pay_to)),
    )
    with Session(ledger.engine) as session:
        return list(session.scalars(query))


def _rows_by_authorization(
    ledger: Ledger, network: str, keys: Sequence[tuple[str, str | None]]
) -> dict[tuple[str, str | None], Payment]:
    found: dict[tuple[str, str | None], Payment] = {}
    with Session(ledger.engine) as session:
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            payers = sorted({k[0] for k in part})
            nonces = sorted({k[1] for k in part if k[1] is not None})
            # Addresses are stored checksummed and nonces lower-case hex: match case-insensitively in Python.
            query = select(Payment).where(Payment.network == network, func.lower(Payment.nonce).in_(nonces))
            for row in session.scalars(query):
                key: tuple[str, str | None] = (row.payer.lower(), row.nonce.lower())
                if key[0] in payers:
                    found[key] = row
    return found


async def reconcile(
    ledger: Ledger,
    chains: dict[str, Any],
    *,
    pay_to: Iterable[str] = (),
    assets: Iterable[tuple[str, str, str]] = (),
    from_block: int = 0,
    to_block: int | None = None,
    schemes: Resolver | None = None,
    chunk: int = DEFAULT_CHUNK_BLOCKS,
) -> Report:
    """Compare ledger and chain. ``chains``: network → a ``Chain`` that is also a ``LogReader``.
    ``assets``: extra (network, asset, pay_to) triples to watch (the catalog's), beyond the ledger's.
    ``schemes``: what resolves open rows (the gateway's registry); by default exact on ``chains``,
    every network's facilitator writing the transaction hash ahead."""
    report = Report()
    wanted = {a.lower() for a in pay_to}

    # 1. Resolve open rows: where this deployment's facilitator writes ahead, an open row without a
    # transaction hash was never broadcast.
    resolver = schemes if schemes is not None else Schemes(exact_resolvers(chains, set(chains)))
    resolutions: list[Resolution] = await resolve_open_payments(ledger, resolver)
    report.resolved = [asdict(r) for r in resolutions]

    # 2. What to look at.
    targets = await asyncio.to_thread(_ledger_targets, ledger, wanted)
    targets |= {(n, a.lower(), p.lower()) for n, a, p in assets if not wanted or p.lower() in wanted}
    by_token: dict[tuple[str, str], set[str]] = defaultdict(set)
    for network, asset, target in targets:
        by_token[(network, asset)].add(target)
    report.pay_to = sorted({t[2] for t in targets})
    report.unchecked_networks = sorted({n for n, _ in by_token} - set(chains))

    # 3. Each (network, token) with a chain to read.
    whole_chain = from_block == 0 and to_block is None
    for (network, asset), pay_tos in sorted(by_token.items()):
        chain = chains.get(network)
        if chain is None:
            continue
        end = to_block if to_block is not None else await chain.block_number()
        report.ranges[network] = {"from_block": from_block, "to_block": end}
        await _reconcile_token(report, ledger, chain, network, asset, pay_tos, from_block, end, whole_chain, chunk)
    for network, blocks in sorted(report.ranges.items()):  # refunds recorded paid: did their transactions pay?
        report.refund_unpaid += await refunds_not_landed(ledger, chains[network], network, from_block, blocks["to_block"],
                                                         whole_chain, _row_json)
    report.still_open = [_row_json(r) for r in await asyncio.to_thread(ledger.open_payments) if r.network in chains]
    return report


async def _reconcile_token(
    report: Report, ledger: Ledger, chain: LogReader, network: str, asset: str, pay_tos: set[str],
    start: int, end: int, whole_chain: bool, chunk: int,
) -> None:
    """One token's EIP-3009 transfers to ``pay_tos`` in [start, end] against the ledger, into ``report``."""
    transfers = await chain_transfers(chain, network, asset, pay_tos, start, end, chunk)
    payments = [t for t in transfers if t.nonce is not None]
    report.chain_payments += len(payments)
    report.chain_other_transfers += len(transfers) - len(payments)
    settled = await asyncio.to_thread(_settled_in_range, ledger, network, asset, pay_tos, start, end, whole_chain)
    report.ledger_settled += len(settled)
    # upto rows and exact ones paid through Permit2 move money through Permit2: no AuthorizationUsed,
    # so they are matched by their own settlement transaction (payer → payTo in it), and their
    # transfer counts as a payment.
    upto = [row for row in settled if moved_by_permit2(row)]
    settled = [row for row in settled if not moved_by_permit2(row)]
    _match_upto(report, upto, [t for t in transfers if t.nonce is None])
    # batch-settlement rows were settled by a claim: its transfer from the escrow pays their sum.
    claims = match_channel_claims([r for r in settled if is_channel_row(r)], [t for t in transfers if t.nonce is None], _row_json)
    settled = [row for row in settled if not is_channel_row(row)]
    report.matched += claims.matched
    report.chain_payments += claims.consumed
    report.chain_other_transfers -= claims.consumed
    report.missing_on_chain += claims.missing_on_chain
    report.amount_mismatch += claims.amount_mismatch
    report.channel_claims += claims.claims
    on_chain: dict[tuple[str, str | None], ChainTransfer] = {(t.payer, t.nonce): t for t in payments}
    _match_authorizations(report, settled, on_chain)
    known = {(r.payer.lower(), r.nonce.lower()) for r in settled}
    unknown = [(t.payer, t.nonce) for t in payments if t.nonce is not None and (t.payer, t.nonce) not in known]
    rows = await asyncio.to_thread(_rows_by_authorization, ledger, network, unknown)
    for key in unknown:
        t = on_chain[key]
        found = rows.get(key)
        if found is None or found.asset.lower() != asset:
            report.missing_in_ledger.append(_transfer_json(t))
        elif found.state not in OPEN_STATES:
            # Failed / voided while the chain moved the money; or settled with a block outside
            # the range asked for (the ledger's block is wrong). Open rows are in still_open.
            report.state_mismatch.append({**_row_json(found), "chain": _transfer_json(t)})


def _match_authorizations(report: Report, settled: list[Payment],
                          on_chain: dict[tuple[str, str | None], ChainTransfer]) -> None:
    """Settled EIP-3009 rows against the transfers of their authorizations. Each transfer backs one
    row: the first (lowest id) naming it; another is ``duplicate_in_ledger``. A matched row is also
    held to the transfer's payTo, transaction and block."""
    first: dict[tuple[str, str], Payment] = {}
    for row in sorted(settled, key=lambda r: r.id):
        key = (row.payer.lower(), row.nonce.lower())
        if key in first:
            report.duplicate_in_ledger.append({**_row_json(row), "same_authorization_as": first[key].id})
            continue
        first[key] = row
        t = on_chain.get(key)
        if t is None:
            report.missing_on_chain.append(_row_json(row))
            continue
        found = {**_row_json(row), "chain": _transfer_json(t)}
        wrong = False
        if t.amount != row.amount:
            report.amount_mismatch.append(found)
            wrong = True
        if t.pay_to != row.pay_to.lower():
            report.payee_mismatch.append(found)
            wrong = True
        if (row.tx_hash and row.tx_hash.lower() != t.tx_hash) or (
                row.block_number is not None and row.block_number != t.block_number):
            report.transaction_mismatch.append(found)
            wrong = True
        if not wrong:
            report.matched += 1


def _match_upto(report: Report, rows: list[Payment], plain: list[ChainTransfer]) -> None:
    """Settled ``upto`` rows against the plain transfers of their own settlement transactions."""
    by_tx = {(t.tx_hash, t.payer, t.pay_to): t for t in plain}
    for row in sorted(rows, key=lambda r: r.id):
        # Each transfer pays for one row: a second row naming the same transaction is missing on chain.
        t = by_tx.pop(((row.tx_hash or "").lower(), row.payer.lower(), row.pay_to.lower()), None)
        if t is None:
            report.missing_on_chain.append(_row_json(row))
            continue
        report.chain_payments += 1
        report.chain_other_transfers -= 1
        if t.amount != row.amount:
            report.amount_mismatch.append({**_row_json(row), "chain": _transfer_json(t)})
        else:
            report.matched += 1
