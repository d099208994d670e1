"""The payment invariant, written once, for every attack test to assert.

    Every 2xx that carries upstream content matches exactly one settled payment in the ledger,
    signed by that payment's payer, for exactly this request (tool, method, path, query, body
    digest = the row's fingerprint), with the matching transfer on chain; or it is a replay
    (``X402GW-Replay: true``) of that same signed payload for that same request. No
    state-changing upstream call runs without a settled (upfront) payment.

Use::

    checker = InvariantChecker(chain=devchain, ledger=gateway.ledger, upstream=recording, catalogs=catalogs,
                               pay_to=PAY_TO)
    checker.begin()                      # snapshot: payee balance, ledger rows, upstream call log
    response = checker.send(client, "GET", "/q/ACME", headers=...)   # send and record
    checker.record(response)             # or record a response sent some other way
    checker.check()                      # per-response facts for everything recorded + global facts

Per-response facts (``check_response``): a 2xx (or anything marked as a replay) names exactly one
ledger row by its authorization's (payer, nonce); the row is settled, is for this tool, method,
path and fingerprint (method, path, query, body digest); the presented authorization equals the
stored one field by field and its signature recovers to the row's payer under the tool's EIP-712
domain; ``accepted`` (v2) or scheme/network (v1) equal the row's terms; on chain the nonce is used
and the row's transaction carries ``AuthorizationUsed(payer, nonce)`` and ``Transfer(payer, payTo,
amount)``; the upstream content in the body (the recording upstream's marker) came from the call
made for that row's request; at most one non-replay 2xx per row. Any other status never carries
upstream content (a marker of an upstream 2xx/3xx answer) nor ``X402GW-Replay``.

Global facts (``check``): the payee's balance change on chain equals the amounts the ledger
settled since ``begin`` (less refunds paid, plus credits the test made outside the gateway and
declared with ``note_external_payee_credit``); every settled row's nonce is used on chain; every
upstream call since ``begin`` belongs to a ledger row of the same tool (matched by the request id
the gateway forwards); a state-changing tool's upstream call found its row already settled at the
moment the upstream was called, and per tool the upstream calls are at most the payments recorded
(state-changing tools: at most the payments settled upfront).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from x402.mechanisms.evm.erc6492 import is_erc6492_signature, parse_erc6492_signature

from catalog import Catalogs, Router
from gateway.pipeline.stages.exactly_once import request_fingerprint
from settlement.chain.client import SEL_BALANCE_OF, TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER
from settlement.chain.networks import to_caip2
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schemes.eip712 import (
    TransferAuthorization,
    authorization_digest,
    domain_separator,
    recover_signer,
)
from settlement.schemes.exact_permit2_payload import moved_by_permit2, parse_exact_permit2, payment_view
from settlement.schemes.upto_permit import PERMIT2_ADDRESS, SEL_NONCE_BITMAP
from settlement.schemes.wallets import is_valid_magic, is_valid_signature_call
from settlement.x402.codec import decode_header_json
from tests.conftest import Devchain
from tests.support.recording_upstream import (
    MARKER_PREFIX,
    RecordingUpstream,
    UpstreamCall,
)

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FINGERPRINT_PARAMS = tuple(inspect.signature(request_fingerprint).parameters)


@dataclass
class Exchange:
    """One request an attack made and the answer it got."""

    label: str
    method: str
    path: str
    query: str
    body: bytes
    request_headers: dict[str, str]
    status: int
    headers: httpx.Headers
    content: bytes

    @property
    def replay(self) -> bool:
        return self.headers.get("x402gw-replay", "").lower() == "true"

    def describe(self) -> str:
        header = "PAYMENT-SIGNATURE" if "payment-signature" in self.request_headers else (
            "X-PAYMENT" if "x-payment" in self.request_headers else "no payment")
        return (f"[{self.label}] {self.method} {self.path}{'?' + self.query if self.query else ''} ({header}) "
                f"-> {self.status} {self.content[:300]!r}")


def fingerprint_of(tool: str, method: str, path: str, query: str, body: bytes) -> str:
    values: dict[str, Any] = {"method": method, "path": path, "query": query, "body": body, "tool": tool}
    return request_fingerprint(**{name: values[name] for name in _FINGERPRINT_PARAMS if name in values})


def _int(value: Any) -> int | None:
    try:
        return int(str(value), 0) if isinstance(value, str) and value.lower().startswith("0x") else int(str(value))
    except (TypeError, ValueError):
        return None


def _topic_address(address: str) -> bytes:
    return bytes.fromhex(address[2:].lower()).rjust(32, b"\x00")


class InvariantViolation(AssertionError):
    pass


def _signed_digest(inner: Any, auth: dict[str, Any], row: Payment, name: str, version: str | None) -> bytes:
    """What the payer signed: the EIP-3009 authorization in the token's EIP-712 domain, or a Permit2
    payment's authorization in Permit2's domain."""
    chain_id = int(row.network.split(":", 1)[1])
    permit = parse_exact_permit2(inner) if isinstance(inner, dict) else None
    if permit is not None:
        return permit.digest(chain_id)
    typed = TransferAuthorization(
        from_=str(auth["from"]), to=str(auth["to"]), value=int(str(auth["value"])),
        valid_after=int(str(auth["validAfter"])), valid_before=int(str(auth["validBefore"])),
        nonce=bytes.fromhex(str(auth["nonce"]).lower().removeprefix("0x")),
    )
    return authorization_digest(domain_separator(name, version or "", chain_id, row.asset), typed)


def _authorization(inner: Any) -> dict[str, Any]:
    """A payload's authorization as EIP-3009 fields (a Permit2 one through its view: from, to,
    value, validAfter, validBefore = deadline, nonce = 0x + 64 hex)."""
    if isinstance(inner, dict) and "permit2Authorization" in inner:
        view: dict[str, Any] = payment_view(inner).model_dump(by_alias=True, mode="json")["authorization"]
        return view
    auth: dict[str, Any] = inner["authorization"]
    return auth


class InvariantChecker:
    def __init__(
        self, *, chain: Devchain, ledger: Ledger, upstream: RecordingUpstream, catalogs: Catalogs, pay_to: str,
        state_changing_tools: set[str] | frozenset[str] = frozenset(), asset: str | None = None,
    ) -> None:
        self.chain = chain
        self.asset = asset or chain.token  # the token the payee's balance is counted in
        self.ledger = ledger
        self.upstream = upstream
        self.catalogs = catalogs
        self.router = Router(catalogs.tools)
        self.pay_to = pay_to
        self.state_changing_tools = set(state_changing_tools) | {
            t.name for t in catalogs.tools if t.method in STATE_CHANGING_METHODS
        }
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._at_call: dict[int, Payment | None] = {}
        self.begin()

    # -- recording ---------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a new scope: what ``check`` compares against."""
        self.exchanges = []
        self.external_credit = 0
        self.pay_to_before = self._balance(self.pay_to)
        self.rows_before = {r.id: r.state for r in self.ledger.all()}
        self.upstream_since = len(self.upstream.snapshot())
        self.upstream.observer = self._observe

    def note_external_payee_credit(self, amount: int) -> None:
        """The test moved ``amount`` to the payee outside the gateway (e.g. used an authorization itself)."""
        self.external_credit += amount

    def _observe(self, call: UpstreamCall) -> None:
        """Runs in the upstream when it is called: what the ledger said about this request then."""
        row = self.ledger.by_request_id(call.request_id) if call.request_id else None
        with self._lock:
            self._at_call[call.seq] = row

    def record(self, response: httpx.Response, label: str = "") -> httpx.Response:
        request = response.request
        query = request.url.query
        self.exchanges.append(Exchange(
            label=label, method=request.method, path=request.url.path,
            query=query.decode() if isinstance(query, bytes) else str(query),
            body=bytes(request.content), request_headers={k.lower(): v for k, v in request.headers.items()},
            status=response.status_code, headers=response.headers, content=response.content,
        ))
        return response

    def send(self, client: httpx.Client, method: str, url: str, *, label: str = "", **kwargs: Any) -> httpx.Response:
        return self.record(client.request(method, url, **kwargs), label)

    # -- checks --------------------------------------------------------------------------------------

    def _wallet_accepts(self, wallet: str, digest: bytes, signature: bytes) -> bool:
        """ERC-1271 ``isValidSignature`` of ``wallet`` (deployed by now) on the chain, with a 6492
        wrapper's inner signature: the same rule as the token's (≥ 32 bytes, first word magic)."""
        if is_erc6492_signature(signature):
            signature = bytes(parse_erc6492_signature(signature).inner_signature)
        data = is_valid_signature_call(digest, signature)
        try:
            result = bytes(self.chain.w3.eth.call({"to": wallet, "data": data}))
        except Exception:
            return False
        return is_valid_magic(result)

    def check_response(self, exchange: Exchange, rows: list[Payment] | None = None) -> None:
        problems = self._response_problems(exchange, rows if rows is not None else self.ledger.all())
        if problems:
            raise InvariantViolation(exchange.describe() + "\n  " + "\n  ".join(problems))

    def check(self) -> None:
        rows = self.ledger.all()
        problems: list[str] = []
        fresh_per_row: Counter[int] = Counter()
        for exchange in self.exchanges:
            found = self._response_problems(exchange, rows)
            if found:
                problems.append(exchange.describe() + "\n    " + "\n    ".join(found))
            elif 200 <= exchange.status < 300 and not exchange.replay:
                row = self._row_for(exchange, rows)
                if row is not None:
                    fresh_per_row[row.id] += 1
        for row_id, count in fresh_per_row.items():
            if count > 1:
                problems.append(f"payment row {row_id} answered {count} non-replay 2xx responses")
        problems += self._global_problems(rows)
        if problems:
            raise InvariantViolation("payment invariant violated:\n  " + "\n  ".join(problems))

    # -- internals --------------------------------------------------------------------------------

    def _payment_of(self, exchange: Exchange) -> tuple[int, dict[str, Any]] | None:
        header = exchange.request_headers.get("payment-signature")
        version = 2
        if header is None:
            header = exchange.request_headers.get("x-payment")
            version = 1
        if header is None:
            return None
        try:
            data = decode_header_json(header)
        except Exception:
            return version, {}
        return version, data if isinstance(data, dict) else {}

    def _row_for(self, exchange: Exchange, rows: list[Payment]) -> Payment | None:
        payment = self._payment_of(exchange)
        if payment is None:
            return None
        try:
            auth = _authorization(payment[1]["payload"])
            payer, nonce = str(auth["from"]).lower(), str(auth["nonce"]).lower()
        except (KeyError, TypeError):
            return None
        matching = [r for r in rows if r.payer.lower() == payer and r.nonce.lower() == nonce]
        return matching[0] if len(matching) == 1 else None

    def _markers(self, text: bytes) -> list[str]:
        out = []
        decoded = text.decode("utf-8", "replace")
        start = decoded.find(MARKER_PREFIX)
        while start != -1:
            out.append(decoded[start:start + len(MARKER_PREFIX) + 32])
            start = decoded.find(MARKER_PREFIX, start + 1)
        return out

    def _response_problems(self, exchange: Exchange, rows: list[Payment]) -> list[str]:
        calls = {c.marker: c for c in self.upstream.snapshot()}
        success = 200 <= exchange.status < 300
        if not success:
            refusal: list[str] = []
            if exchange.replay:
                refusal.append("a non-2xx answer is marked X402GW-Replay")
            leaked = self._markers(exchange.content) + [
                m for value in exchange.headers.values() for m in self._markers(value.encode())
            ]
            for marker in leaked:
                call = calls.get(marker)
                if call is None or call.status < 400:
                    refusal.append(f"upstream content {marker} served with status {exchange.status}")
            return refusal
        match = self.router.match("GET" if exchange.method == "HEAD" else exchange.method, exchange.path)
        if match is None:
            return []  # not a tool: no paid content
        tool = match.tool
        payment = self._payment_of(exchange)
        if payment is None:
            return ["2xx with upstream content but no payment header"]
        version, data = payment
        try:
            inner = data["payload"]
            auth = _authorization(inner)
            signature = bytes.fromhex(str(inner["signature"]).removeprefix("0x"))
            payer, nonce = str(auth["from"]), str(auth["nonce"]).lower()
        except (KeyError, TypeError, ValueError) as exc:
            return [f"2xx for a payment that does not parse ({type(exc).__name__}: {exc})"]
        matching = [r for r in rows if r.payer.lower() == payer.lower() and r.nonce.lower() == nonce]
        if len(matching) != 1:
            return [f"2xx matches {len(matching)} ledger rows for payer {payer} nonce {nonce}, not exactly one"]
        row = matching[0]
        problems: list[str] = []
        if row.state != PaymentState.SETTLED:
            problems.append(f"row {row.id} is {row.state}, not settled")
        if row.tool != tool.name:
            problems.append(f"row {row.id} paid for tool {row.tool}, this request is {tool.name}")
        method = "GET" if exchange.method == "HEAD" else exchange.method
        if (row.method, row.path) != (method, exchange.path):
            problems.append(f"row {row.id} paid for {row.method} {row.path}, this request is {method} {exchange.path}")
        fingerprint = fingerprint_of(tool.name, exchange.method, exchange.path, exchange.query, exchange.body)
        if row.fingerprint != fingerprint:
            problems.append(f"row {row.id} fingerprint {row.fingerprint} != this request's {fingerprint}")
        # the presented authorization is the stored one, field by field
        try:
            stored = _authorization(json.loads(row.authorization))
        except (ValueError, KeyError, TypeError):
            stored = {}
        for name in ("from", "to", "nonce"):
            if str(auth.get(name, "")).lower() != str(stored.get(name, "?")).lower():
                problems.append(f"authorization.{name} {auth.get(name)!r} != stored {stored.get(name)!r}")
        for name in ("value", "validAfter", "validBefore"):
            if _int(auth.get(name)) is None or _int(auth.get(name)) != _int(stored.get(name)):
                problems.append(f"authorization.{name} {auth.get(name)!r} != stored {stored.get(name)!r}")
        if _int(auth.get("value")) != row.amount or str(auth.get("to", "")).lower() != row.pay_to.lower():
            problems.append("authorization value/to differ from the row's amount/payTo")
        # signed by the row's payer, over exactly this authorization, in the tool's EIP-712 domain
        # (a Permit2 payment: over its Permit2 authorization, in Permit2's domain)
        try:
            digest = _signed_digest(inner, auth, row, tool.payment.asset_name, tool.payment.asset_version)
            signer = recover_signer(digest, signature)
            if signer is None or signer.lower() != row.payer.lower():
                # A contract wallet's signature (issue 16): the payer, on chain now, accepts it.
                signer = row.payer if self._wallet_accepts(row.payer, digest, signature) else signer
        except (KeyError, TypeError, ValueError) as exc:
            signer = None
            problems.append(f"authorization not well formed: {exc}")
        if signer is None or signer.lower() != row.payer.lower():
            problems.append(f"signature recovers to {signer}, not the row's payer {row.payer}")
        # the terms the payment was made for
        if version == 2:
            accepted = data.get("accepted") or {}
            terms = (accepted.get("scheme"), accepted.get("network"), str(accepted.get("asset", "")).lower(),
                     str(accepted.get("payTo", "")).lower(), _int(accepted.get("amount")))
            want = ("exact", row.network, row.asset.lower(), row.pay_to.lower(), row.amount)
            if terms != want:
                problems.append(f"accepted {terms} != the row's terms {want}")
        else:
            try:
                network = to_caip2(str(data.get("network")))
            except Exception:
                network = None
            if data.get("scheme") != "exact" or network != row.network:
                problems.append(f"v1 scheme/network {data.get('scheme')}/{data.get('network')} != exact/{row.network}")
        # the transfer on chain
        if not self._nonce_used(row):
            problems.append(f"nonce {row.nonce} of {row.payer} is not used on chain")
        if row.tx_hash:
            problems += self._transfer_problems(row)
        else:
            problems.append(f"row {row.id} is served but names no transaction")
        # the content came from this payment's own upstream call
        for marker in self._markers(exchange.content):
            call = calls.get(marker)
            if call is None:
                problems.append(f"content marker {marker} is from no upstream call")
            elif call.request_id != row.request_id:
                problems.append(f"content {marker} was fetched for request {call.request_id}, "
                                f"not for the payment's request {row.request_id}")
        return problems

    def _transfer_problems(self, row: Payment) -> list[str]:
        try:
            receipt = self.chain.w3.eth.get_transaction_receipt(str(row.tx_hash))  # type: ignore[arg-type]
        except Exception as exc:
            return [f"transaction {row.tx_hash} of row {row.id} not found: {exc}"]
        problems = []
        if receipt["status"] != 1:
            problems.append(f"transaction {row.tx_hash} reverted")
        token = row.asset.lower()
        nonce = bytes.fromhex(row.nonce.removeprefix("0x"))
        used, transfer = moved_by_permit2(row), False  # Permit2 logs no AuthorizationUsed: its bitmap says
        for log in receipt["logs"]:
            if log["address"].lower() != token:
                continue
            topics = [bytes(t) for t in log["topics"]]
            if topics[:3] == [TOPIC_AUTHORIZATION_USED, _topic_address(row.payer), nonce]:
                used = True
            if topics[:3] == [TOPIC_TRANSFER, _topic_address(row.payer), _topic_address(row.pay_to)] and (
                int.from_bytes(bytes(log["data"])[:32], "big") == row.amount
            ):
                transfer = True
        if not used:
            problems.append(f"transaction {row.tx_hash} has no AuthorizationUsed({row.payer}, {row.nonce})")
        if not transfer:
            problems.append(f"transaction {row.tx_hash} has no Transfer({row.payer} -> {row.pay_to}, {row.amount})")
        return problems

    def _balance(self, owner: str) -> int:
        data = SEL_BALANCE_OF + bytes.fromhex(owner[2:].rjust(64, "0"))
        return int.from_bytes(self.chain.w3.eth.call({"to": self.asset, "data": data}), "big")  # type: ignore[typeddict-item]

    def _nonce_used(self, row: Payment) -> bool:
        """The row's authorization is spent on chain: the token's EIP-3009 state, or Permit2's bitmap."""
        if not moved_by_permit2(row):
            return self.chain.authorization_state(row.payer, row.nonce)
        nonce = int(row.nonce, 16)
        data = SEL_NONCE_BITMAP + _topic_address(row.payer) + (nonce >> 8).to_bytes(32, "big")
        bitmap = int.from_bytes(self.chain.w3.eth.call({"to": PERMIT2_ADDRESS, "data": data}), "big")  # type: ignore[typeddict-item]
        return bool(bitmap >> (nonce & 0xFF) & 1)

    def _global_problems(self, rows: list[Payment]) -> list[str]:
        problems: list[str] = []
        settled_now = [r for r in rows if r.state == PaymentState.SETTLED and self.rows_before.get(r.id) != PaymentState.SETTLED]
        refunded_now = [r for r in rows if r.refunded_at is not None and r.id not in self.rows_before]
        expected = sum(r.amount for r in settled_now) - sum(r.amount for r in refunded_now) + self.external_credit
        delta = self._balance(self.pay_to) - self.pay_to_before
        if delta != expected:
            problems.append(
                f"payee balance changed by {delta} on chain; the ledger settled {sum(r.amount for r in settled_now)} "
                f"(rows {[r.id for r in settled_now]}), refunded {sum(r.amount for r in refunded_now)}, "
                f"external credit {self.external_credit}"
            )
        for row in settled_now:
            if not self._nonce_used(row):
                problems.append(f"settled row {row.id}: nonce {row.nonce} is not used on chain")
        by_request = {r.request_id: r for r in rows}
        calls = self.upstream.snapshot()[self.upstream_since:]
        per_tool: Counter[str] = Counter()
        for call in calls:
            per_tool[call.tool] += 1
            paid = by_request.get(call.request_id or "")
            if paid is None:
                problems.append(f"upstream call {call.method} {call.path} (request {call.request_id}) has no payment")
                continue
            if paid.tool != call.tool:
                problems.append(f"upstream call for {call.tool} was paid as {paid.tool} (row {paid.id})")
            if call.tool in self.state_changing_tools:
                with self._lock:
                    seen = self._at_call.get(call.seq)
                if seen is None or seen.state != PaymentState.SETTLED:
                    problems.append(
                        f"state-changing upstream call {call.method} {call.path} ran while its payment was "
                        f"{seen.state if seen else 'unrecorded'}"
                    )
        new_rows = [r for r in rows if r.id not in self.rows_before]
        for tool, count in per_tool.items():
            if tool in self.state_changing_tools:
                allowed = sum(1 for r in new_rows if r.tool == tool and r.state == PaymentState.SETTLED
                              and r.settle_mode == "upfront")
            else:
                allowed = sum(1 for r in new_rows if r.tool == tool)
            if count > allowed:
                problems.append(f"tool {tool}: {count} upstream calls for {allowed} qualifying payments")
        return problems
