"""Stage 4, safety: what an agent may do, decided on the server before money or the upstream moves.

Checks run in this order; each either returns (continue) or raises a ``GatewayError``:

    route ─▶ header size (431) ─▶ body size (413) ─▶ arguments (422)
          ─▶ kill switch (503 tool_disabled) ─▶ price guard (503 price_guard; a rule's
             price of these arguments: 422 price_above_max)
          ─▶ circuit breaker (503 upstream_circuit_open) ─▶ rate limit per client (429, every request)
          ─▶ [unpaid] 402
          ─▶ [paid] decode/bind ─▶ signature recovered offline (402) ─▶ payer allow/deny (403 payer_denied)
          ─▶ rate limit per payer (429) ─▶ verify ─▶ per tool (429) ─▶ budgets (403 budget_exceeded)

Nothing is keyed on a payment's claimed ``from`` before its signature recovered to it: a junk
header naming a victim spends only its own client's tokens, never the victim's or the tool's.
          ─▶ bridge ─▶ settle ─▶ ``finish``: budgets released unless money moved; probe returned

Reads the catalog's and the settings' limits (``catalog.limits``), the policy (``gateway.safety.policy``)
and the breakers (``gateway.safety.breaker``); writes only to the state store. Per-request state (the
reservations, the breaker ticket) lives in ``ctx.safety``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, Protocol

from catalog import Catalogs, PaymentTerms, Tool, format_amount, to_atomic
from catalog.limits import Budget, Budgets, RateLimit, RateLimits
from gateway import codes
from gateway.errors import GatewayError
from gateway.safety.breaker import UNREAD, Breakers, Ticket, Unread, upstream_key
from gateway.safety.limits import Limits
from gateway.safety.policy import OVERRIDES_KEY, Policy, PolicyView
from gateway.store import MAX_EXACT_UNITS, StateStore, StoreUnavailable
from settlement.ledger import Ledger, PaymentState

__all__ = ["Limits", "Safety"]


class RequestContext(Protocol):
    """What safety reads and writes of a request (the pipeline's ``RequestContext`` has it all):
    declared here so the safety room does not import the pipeline that calls it."""

    request_id: str
    client: str | None
    payment_id: int | None
    outcome: str
    safety: Any  # what this request holds: budget reservations, the breaker's probe

    def record(self, event: str, **fields: Any) -> None: ...

log = logging.getLogger("x402gw.safety")

# Outcomes after which money may have moved: the budget reservation is kept (unless the ledger row says it
# failed, was voided or refunded). An exact stream settled before it started ("streaming"), a metered one as it ended.
_MONEY_MAY_HAVE_MOVED = frozenset({"settling", "settled", "streaming", "refund_owed", "refunded"})


# Budgets over dollar stablecoins (``usd_pegged`` assets) count in dollars, every such asset on every
# network into one counter, in units of 10**-USD_DECIMALS dollars: exact for any token's decimals.
USD_DECIMALS = 36


def _offer_key(tool: Tool) -> tuple[str, str, str]:
    """Budget rules are compiled per tool and offer; ``tool`` is the tool as paid with one offer."""
    return tool.name, tool.payment.network, tool.payment.asset


@dataclass(frozen=True)
class _BudgetRule:
    name: str  # per_payer | per_payer_per_tool | per_owner
    level: str  # "gateway" | "owner:<owner>" | "tool:<name>": where the limit was written
    limit: int  # atomic units of the offer's token; for a dollar stablecoin, of USD_DECIMALS dollars
    window: int
    decimals: int  # of ``limit``: the token's, or USD_DECIMALS
    usd: bool = False  # counted in dollars with every other dollar stablecoin
    scale: int = 1  # token atomic units → the rule's units

    def key(self, tool: Tool, payer: str) -> str:
        unit = ["usd"] if self.usd else [tool.payment.network, tool.payment.asset.lower()]
        parts = ["budget", self.level, self.name, *unit]
        if self.name == "per_payer_per_tool" or (self.name == "per_owner" and self.level == "gateway"):
            parts.append(tool.name if self.name == "per_payer_per_tool" else tool.owner)
        if self.name != "per_owner":
            parts.append(payer.lower())
        return ":".join(parts)


@dataclass(frozen=True)
class _RateRule:
    name: str  # per_payer | per_tool | per_client
    level: str
    limit: RateLimit

    def key(self, tool: Tool, subject: str) -> str:
        return f"rl:{self.level}:{self.name}:{tool.name if self.name == 'per_tool' else subject.lower()}"


@dataclass(frozen=True)
class _Reservation:
    rule: _BudgetRule
    key: str
    amount: int
    resets_at: int


@dataclass
class Held:
    """What this request holds in the store until ``finish``."""

    view: PolicyView | None = None
    ticket: Ticket | None = None
    reservations: list[_Reservation] = field(default_factory=list)
    reserved: int = 0  # atomic units reserved (an upto payment's maximum), against what settles


# The two context managers below are classes, not @contextlib.contextmanager generators: they
# wrap every check of every request, and a generator per ``with`` cost more than the check.


class _StoreErrors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Literal[False]:
        if isinstance(exc, StoreUnavailable):
            # fail closed: without the shared state no limit can be enforced, so nothing is sold
            raise GatewayError(codes.STORE_UNAVAILABLE, "the gateway's shared state is unavailable; retry later",
                               status=503, retryAfter=2) from None
        return False


_store_errors = _StoreErrors  # ``with _store_errors():`` a fresh one each time (no state: cheap)


class _Verdict:
    """Every refusal of a stage goes to the audit trail with the rule that made it."""

    __slots__ = ("ctx", "stage")

    def __init__(self, ctx: RequestContext, stage: str) -> None:
        self.ctx = ctx
        self.stage = stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> Literal[False]:
        if isinstance(err, GatewayError):
            rule = err.fields.get("budget") or err.fields.get("limit") if err.code in ("budget_exceeded", "rate_limited") else None
            self.ctx.record("safety_verdict", stage=self.stage, verdict="deny", rule=rule or err.code, reason=err.code)
        return False


class Safety:
    def __init__(
        self,
        store: StateStore,
        catalogs: Catalogs,
        limits: Limits | None = None,
        *,
        policy: Policy | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.policy = policy or Policy(store)
        self.breakers = breakers or Breakers(store, catalogs.tools)
        # The kill switches and the breakers share this store: read together before a 402 (one round trip).
        self._read_together = self.policy.store is store and self.breakers.store is store
        self._budgets: dict[tuple[str, str, str], list[_BudgetRule]] = {}
        self._rates: dict[str, list[_RateRule]] = {}
        self._ceilings: dict[str, Decimal] = {}
        # Told of a budget's first refusal in each window (owner, event, data): budget.exhausted.
        self.on_event: Callable[[str, str, dict[str, Any]], Awaitable[None]] | None = None
        self._exhausted: set[tuple[str, int]] = set()
        for catalog in catalogs.catalogs:
            for tool in catalog.tools:
                self._compile(tool, catalog.budgets, catalog.rate_limits, catalog.max_price)

    def _compile(self, tool: Tool, budgets: Budgets, rates: RateLimits, catalog_max: Decimal | None) -> None:
        sources: list[tuple[str, Budgets, RateLimits]] = [
            ("gateway", self.limits.budgets, self.limits.rate_limits),
            (f"owner:{tool.owner}", budgets, rates),
            (f"tool:{tool.name}", tool.budgets, tool.rate_limits),
        ]
        for offer in tool.offers:
            self._budgets[_offer_key(tool.paid_with(offer))] = self._budget_rules(tool, offer.terms, sources)
        rate_rules: list[_RateRule] = []
        for level, _, level_rates in sources:
            for name in ("per_payer", "per_tool", "per_client"):
                rate: RateLimit | None = getattr(level_rates, name)
                if rate is not None:
                    rate_rules.append(_RateRule(name, level, rate))
        self._rates[tool.name] = rate_rules
        ceilings = [c for c in (tool.max_price, catalog_max, self.limits.max_price) if c is not None]
        if ceilings:
            self._ceilings[tool.name] = min(ceilings)

    @staticmethod
    def _budget_rules(tool: Tool, terms: PaymentTerms, sources: list[tuple[str, Budgets, RateLimits]]) -> list[_BudgetRule]:
        """The budgets of one offer of ``tool``: in dollars for a dollar stablecoin, else in its token."""
        decimals = USD_DECIMALS if terms.usd_pegged else terms.decimals
        scale = 10 ** (USD_DECIMALS - terms.decimals) if terms.usd_pegged else 1
        rules: list[_BudgetRule] = []
        for level, level_budgets, _ in sources:
            for name in ("per_payer", "per_payer_per_tool", "per_owner"):
                budget: Budget | None = getattr(level_budgets, name)
                if budget is None:
                    continue
                try:  # in dollars or not, a budget must be an amount of the offer's token
                    limit = to_atomic(budget.amount, terms.decimals) * scale
                except ValueError:
                    raise ValueError(
                        f"budget {name} {budget.amount:f} ({level}) has more digits than the {terms.decimals} decimals "
                        f"of the token of tool {tool.name}"
                    ) from None
                if limit > MAX_EXACT_UNITS:
                    raise ValueError(f"budget {name} {budget.amount:f} ({level}) is too large for tool {tool.name}")
                rules.append(_BudgetRule(name, level, limit, budget.window, decimals, terms.usd_pegged, scale))
        return rules

    # -- before the 402 --------------------------------------------------------------------------

    _verdict = _Verdict

    def check_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        size = sum(len(name) + len(value) + 4 for name, value in headers)  # ": " and CRLF
        if size > self.limits.max_header_bytes:
            raise GatewayError(
                codes.REQUEST_HEADERS_TOO_LARGE,
                f"request headers are limited to {self.limits.max_header_bytes} bytes in total",
                status=431, limit=self.limits.max_header_bytes,
            )

    async def before_challenge(self, ctx: RequestContext, tool: Tool, price_atomic: int) -> None:
        """Kill switch, price guard, circuit breaker: none of them may be answered with a price."""
        with self._verdict(ctx, "before_challenge"):
            await self._before_challenge(ctx, tool, price_atomic)

    async def _before_challenge(self, ctx: RequestContext, tool: Tool, price_atomic: int) -> None:
        held = ctx.safety = Held()
        policy, breakers = self.policy, self.breakers
        open_raw: bytes | None | Unread = UNREAD
        if self._read_together:
            with _store_errors():
                overrides, open_raw = await self.store.get_many([OVERRIDES_KEY, breakers.open_key(tool)])
            held.view = policy.view_from(overrides)
        else:
            held.view = await policy.current()
        reason = held.view.tool_disabled(tool.name, tool.owner)
        if reason is not None:
            raise GatewayError(codes.TOOL_DISABLED, f"{tool.name} is not available: {reason}", status=503, retryable=False)
        self.price_guard(tool, price_atomic)
        with _store_errors():
            held.ticket = await breakers.check(tool, None, open_raw=open_raw)  # half-open: the probe waits for verify

    def price_guard(self, tool: Tool, price_atomic: int) -> None:
        ceiling = self._ceilings.get(tool.name)
        if ceiling is None or Decimal(price_atomic) <= ceiling.scaleb(tool.payment.decimals):
            return
        if tool.price_rule is not None:  # these arguments' price, not the tool's: ask for less
            raise GatewayError(
                codes.PRICE_ABOVE_MAX,
                f"{tool.name} costs {format_amount(price_atomic, tool.payment.decimals)} for these arguments "
                f"above its maximum {ceiling:f}; ask for less ({', '.join(tool.price_rule.per)} set the price)",
                fields=[{"field": name} for name in tool.price_rule.per], maximum=f"{ceiling:f}",
            )
        log.error("price guard: %s priced %s atomic, above its maximum %s", tool.name, price_atomic, ceiling)
        raise GatewayError(
            codes.PRICE_GUARD, "this tool's price is above the maximum this gateway allows; it is not sold now",
            status=503, retryable=False,
        )

    async def per_client(self, ctx: RequestContext, tool: Tool) -> None:
        """Rate limit per client address, for every request (paid or not, before any verify)."""
        with self._verdict(ctx, "per_client"):
            await self._take(tool, "per_client", ctx.client or "unknown")

    # -- with a payment ----------------------------------------------------------------------------

    async def before_verify(self, ctx: RequestContext, tool: Tool, payer: str, *, per_payer: bool = True) -> None:
        """Payer lists (and, ``per_payer``, the payer's tokens: a sign-in's, which is not public). ``payer``
        is the signer recovered offline, not yet checked against the chain: good enough to refuse,
        never to spend a payment's tokens against (a settled payment's signature is public, and replayed
        it would spend its payer's): those wait for verify (``per_tool``), as budgets do."""
        with self._verdict(ctx, "before_verify"):
            view = ctx.safety.view if isinstance(ctx.safety, Held) and ctx.safety.view else await self.policy.current()
            reason = view.payer_refused(payer)
            if reason is not None:
                raise GatewayError(codes.PAYER_DENIED, f"payments from {payer} are not accepted: {reason}",
                                   status=403, retryable=False)
            if per_payer:
                await self._take(tool, "per_payer", payer)

    async def per_tool(self, ctx: RequestContext, tool: Tool, payer: str | None = None) -> None:
        """After verify: the verified ``payer``'s tokens (when given), the tool's, and a half-open
        breaker's probe (503 while another holds it)."""
        with self._verdict(ctx, "per_tool"):
            if payer is not None:
                await self._take(tool, "per_payer", payer)
            held = ctx.safety
            if isinstance(held, Held) and held.ticket is not None and held.ticket.half_open:
                with _store_errors():
                    held.ticket = await self.breakers.check(tool, ctx.request_id)
            await self._take(tool, "per_tool", tool.name)

    async def _take(self, tool: Tool, name: str, subject: str) -> None:
        for rule in self._rates[tool.name]:
            if rule.name != name:
                continue
            with _store_errors():
                decision = await self.store.take_token(
                    rule.key(tool, subject), rule.limit.rate_per_second, rule.limit.capacity
                )
            if not decision.allowed:
                wait = max(1, math.ceil(decision.retry_after_seconds))
                raise GatewayError(
                    codes.RATE_LIMITED, f"too many requests ({name}, {rule.limit.requests} per {rule.limit.window}s); "
                    f"retry in {wait}s", status=429, retryAfter=wait, limit=name,
                )

    async def reserve(self, ctx: RequestContext, tool: Tool, payer: str, amount: int) -> None:
        """Reserve ``amount`` against every budget of the tool, after verify and before any money or
        upstream moves. Each reservation is one atomic store operation; if a later one refuses,
        the earlier ones are given back, so a refusal never leaves anything counted."""
        with self._verdict(ctx, "budgets"):
            await self._reserve(ctx, tool, payer, amount)
        rules = self._budgets[_offer_key(tool)]
        if rules:
            ctx.record("safety_verdict", stage="budgets", verdict="allow", rules=[rule.name for rule in rules])

    async def _reserve(self, ctx: RequestContext, tool: Tool, payer: str, amount: int) -> None:
        """``tool``: as paid with the payer's offer; ``amount``: atomic units of that offer's token."""
        held = ctx.safety if isinstance(ctx.safety, Held) else Held()
        ctx.safety = held
        held.reserved = amount
        for rule in self._budgets[_offer_key(tool)]:
            key = rule.key(tool, payer)
            units = amount * rule.scale
            with _store_errors():
                decision = await self.store.reserve_budget(key, units, rule.limit, rule.window)
            if decision.allowed:
                held.reservations.append(_Reservation(rule, key, units, decision.resets_at))
                continue
            await self._release(held)
            await self._exhausted_once(tool, rule.name, key, int(decision.resets_at))
            # A dollar budget's limit and use read in dollars, their atomic forms in the offer's token.
            raise GatewayError(
                codes.BUDGET_EXCEEDED,
                f"this call would pass the {rule.name.replace('_', ' ')} budget of "
                f"{format_amount(rule.limit, rule.decimals)} per {rule.window}s; nothing was charged",
                status=403, retryable=False, budget=rule.name, scope=rule.level.split(":", 1)[0],
                limit=format_amount(rule.limit, rule.decimals), limitAtomic=str(rule.limit // rule.scale),
                used=format_amount(decision.used, rule.decimals), usedAtomic=str(decision.used // rule.scale),
                price=format_amount(units, rule.decimals), windowSeconds=rule.window,
                resetsAt=datetime.fromtimestamp(decision.resets_at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            )

    async def _exhausted_once(self, tool: Tool, budget: str, key: str, resets_at: int) -> None:
        if self.on_event is None or (key, resets_at) in self._exhausted:
            return
        if len(self._exhausted) > 10_000:
            self._exhausted.clear()  # bounded: at worst a window's event is sent twice
        self._exhausted.add((key, resets_at))
        await self.on_event(tool.owner, "budget.exhausted", {"budget": budget, "tool": tool.name, "resetsAt": resets_at})

    async def upstream_result(self, ctx: RequestContext, tool: Tool, ok: bool) -> None:
        """Feed the breaker: ``ok`` is False for 5xx, timeouts and connection errors."""
        held = ctx.safety if isinstance(ctx.safety, Held) else None
        ticket = held.ticket if held is not None and held.ticket is not None else Ticket(upstream_key(tool))
        try:
            await self.breakers.record(ticket, ok)
        except StoreUnavailable:
            log.warning("breaker state not recorded for %s: the store is unavailable", ticket.upstream)

    async def finish(self, ctx: RequestContext, ledger: Ledger) -> None:
        """Always runs (in the pipeline's ``finally``): give back budget reservations unless money
        moved or may have moved, and the breaker's probe if this request held it. Never raises."""
        held = ctx.safety
        if not isinstance(held, Held):
            return
        try:
            if held.ticket is not None:
                await self.breakers.release(held.ticket)
            if not held.reservations:
                return
            moved = await self._money_moved(ctx, ledger, held.reserved)
            if moved is None:
                await self._release(held)
            elif moved < held.reserved:
                await self._release(held, held.reserved - moved)  # an upto charge below its maximum
        except Exception:
            log.exception("safety cleanup failed on request %s", ctx.request_id)

    async def _money_moved(self, ctx: RequestContext, ledger: Ledger, reserved: int) -> int | None:
        """None: nothing moved (the reservations go back whole); else the most that may have moved: a
        settled row's amount less a refund paid back, or (outcome unknown) everything reserved."""
        if ctx.outcome not in _MONEY_MAY_HAVE_MOVED or ctx.payment_id is None:
            return None
        row = await asyncio.to_thread(ledger.get, ctx.payment_id)
        if row is None or row.state not in (PaymentState.SETTLED, PaymentState.FAILED, PaymentState.VOIDED):
            return reserved
        moved = row.amount - (row.refund_owed or 0 if row.refunded_at else 0) if row.state == PaymentState.SETTLED else 0
        return moved if moved > 0 else None

    async def _release(self, held: Held, atomic: int | None = None) -> None:
        """Give back every reservation, or ``atomic`` units of each (the part that was not charged)."""
        while held.reservations:
            r = held.reservations.pop()
            with _store_errors():
                await self.store.release_budget(r.key, r.amount if atomic is None else atomic * r.rule.scale,
                                                r.rule.window, r.resets_at)
