"""Read catalog YAML files into resolved, validated ``Catalog`` objects.

``catalog.source`` reads a file (YAML, line map, issues); this module validates it against the
file shapes (``catalog.documents``), resolves each tool against its catalog (upstream, effective
payment terms, settle mode) and checks what spans tools: names and routes unique, within a file
and across files. A load either returns a catalog or raises one ``CatalogError`` listing every
issue.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import ParamSpec, TypeVar

from pydantic import ValidationError

from catalog.across import across_files
from catalog.answers import answers_problems
from catalog.bridge import bridge_problems
from catalog.documents import CatalogDoc, ToolDoc
from catalog.errors import CatalogError, CatalogIssue
from catalog.fields import SHARED_SCHEMAS
from catalog.interpolation import interpolate, needs_interpolation, variables_note
from catalog.models import (
    SETTLE_MARGIN_SECONDS,
    Catalog,
    Catalogs,
    PaymentOffer,
    PaymentTerms,
    SettleMode,
    Tool,
    Upstream,
    consistency_problems,
    default_settle,
    max_call_seconds,
    payment_window_seconds,
)
from catalog.offers import resolve_offers
from catalog.price_rules import PriceRule, PriceRuleDoc, build_rule, rule_problems
from catalog.reaccess import reaccess_problems
from catalog.registry import Stablecoin
from catalog.source import Source, read_catalog_text
from catalog.templates import route_shape
from catalog.terms import TermsResolver, dollar_problem
from catalog.upto import upto_offers, upto_terms
from catalog.usage import stream_problems, usage_problems
from catalog.user_auth import user_auth_problems

__all__ = ["load_catalog", "load_catalogs", "parse_catalog", "price_ceiling_issues"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_RouteShape = tuple[str, tuple[str | None, ...]]
# network → its stablecoins as a deployment file has them, in place of the registry's (the local
# chain's test token); see catalog.registry.with_local_token.
LocalTokens = Mapping[str, Iterable[Stablecoin]] | None
# The environment ``${NAME}`` in a catalog's values reads (catalog.interpolation), handed in by the
# caller (the gateway passes os.environ); None: an empty one, so only defaults resolve.
Environment = Mapping[str, str] | None


def _resolve(doc: CatalogDoc, src: Source, local: LocalTokens) -> Catalog | None:
    upstreams = {name: Upstream(name=name, **u.model_dump()) for name, u in doc.upstreams.items()}
    resolver = TermsResolver(doc.payment, local)
    defaults, _, problems = resolver.resolve()
    for field, code, message in problems:
        src.issue(f"payment.{field}", code, message)
    tools: list[Tool] = []
    names: dict[str, int] = {}
    routes: dict[_RouteShape, int] = {}
    for index, spec in enumerate(doc.tools):
        at = f"tools[{index}]"
        before = len(src.issues)
        _check_unique(doc, index, names, routes, src)
        upstream = _pick_upstream(spec, upstreams, at, src)
        spec, rule = _priced(spec, at, src)
        payment = _tool_terms(resolver, spec, at, src) if defaults is not None else None
        if payment is not None:
            payment, problem = upto_terms(payment, spec.max_price, doc.max_price)
            if problem is not None:
                src.issue(f"{at}.max_price", "upto_needs_max_price", problem)
        upstream_path = spec.upstream_path or spec.path
        exact_stream = spec.stream and payment is not None and payment.scheme != "upto"  # settled before it starts
        settle = spec.settle or ("upfront" if exact_stream else default_settle(spec.method, spec.side_effects))
        if payment is not None:
            _check_tool(doc, spec, at, upstream, payment, upstream_path, settle, src, rule)
        alternatives = _tool_offers(doc, spec, at, payment, settle, upstream, local, src) if payment is not None else ()
        if rule is not None and payment is not None:
            _check_rule(doc, spec, at, rule, (payment, *(o.terms for o in alternatives)), src)
        # Every offer, not only the first: an exact offer beside a usage tool's upto one sold the metered
        # answer at one unit's price, and streamed before it settled.
        for n, terms in enumerate((payment, *(o.terms for o in alternatives)) if payment is not None else ()):
            where = at if n == 0 else f"{at}.offers[{n - 1}]"
            for field, code, message in stream_problems(
                kind=spec.kind, scheme=terms.scheme, settle=settle, usage=spec.usage, answers=spec.answers is not None,
                failure_rules=bool(spec.failure_when),
            ) if spec.stream else ():
                src.issue(f"{where}.{field}", code, message)
            for field, code, message in usage_problems(
                spec.usage, scheme=terms.scheme, settle=settle, stream=spec.stream, kind=spec.kind,
                has_price_rule=rule is not None, maximum=terms.maximum, decimals=terms.decimals,
            ) if spec.usage is not None else ():
                src.issue(f"{where}.usage.{field}", code, message)
        if len(src.issues) > before or upstream is None or payment is None:
            continue
        tools.append(_tool(doc, spec, upstream, payment, upstream_path, settle, src.name, alternatives, rule))
    if src.issues or defaults is None:
        return None
    return Catalog(
        source=src.name, owner=doc.owner, description=doc.description,
        payment=defaults, upstreams=upstreams, tools=tuple(tools),
        max_price=doc.max_price, budgets=doc.budgets, rate_limits=doc.rate_limits,
    )


def _tool_offers(
    doc: CatalogDoc, spec: ToolDoc, at: str, payment: PaymentTerms, settle: SettleMode, upstream: Upstream | None,
    local: LocalTokens, src: Source,
) -> tuple[PaymentOffer, ...]:
    """The tool's further offers (``catalog.offers``): its own ``offers``, else the catalog's. A
    problem of the catalog's offers is reported at them, naming the tool."""
    own = spec.offers is not None
    docs = spec.offers if spec.offers is not None else doc.offers
    offers, problems = resolve_offers(payment, spec.amount, docs, local)
    for field, code, message in problems:
        src.issue(f"{at}.{field}", code, message) if own else src.issue(field, code, f"{spec.name}: {message}")
    offers, missing = upto_offers(offers, spec.max_price, doc.max_price)  # upto offers sign for max_price
    for index, problem in missing:
        src.issue(f"{at}.offers[{index}]" if own else f"offers[{index}]", "upto_needs_max_price", f"{spec.name}: {problem}")
    ceilings = [m for m in (spec.max_price, doc.max_price) if m is not None]
    window = _payment_window(upstream, settle)
    for index, offer in enumerate(offers):
        where = f"{at}.offers[{index}]" if own else f"offers[{index}]"
        if any(offer.price > ceiling for ceiling in ceilings):
            src.issue(f"{where}.price" if own else where, "price_above_max",
                      f"{spec.name}: price {offer.price:f} is above the maximum {min(ceilings):f}")
        if offer.terms.max_timeout_seconds < window:
            src.issue(where, "payment_window_too_short",
                      f"{spec.name}: settle: {settle} needs max_timeout_seconds >= {window}, got {offer.terms.max_timeout_seconds}")
    return offers


def _payment_window(upstream: Upstream | None, settle: SettleMode) -> int:
    """The least ``max_timeout_seconds`` a tool's payment can have (``Tool.payment_window_seconds``)."""
    return 0 if upstream is None else payment_window_seconds(upstream, settle)


def _priced(spec: ToolDoc, at: str, src: Source) -> tuple[ToolDoc, PriceRule | None]:
    """A tool priced by a rule (``catalog.price_rules``): the rule, and the tool with its price of a
    count of 1 in ``price``, which the checks of a fixed price (dollars, precision, ceilings) read."""
    if not isinstance(spec.price, PriceRuleDoc):
        return spec, None
    rule, problems = build_rule(spec.price, spec.input_schema)
    for field, code, message in problems:
        src.issue(f"{at}.price" if field == "price" else f"{at}.price.{field}", code, message)
    if rule is None:
        return spec.model_copy(update={"price": Decimal(1)}), None  # reported; the tool is left out
    return spec.model_copy(update={"price": rule.reference}), rule


def _check_rule(doc: CatalogDoc, spec: ToolDoc, at: str, rule: PriceRule, terms: Iterable[PaymentTerms], src: Source) -> None:
    """Every amount of the rule is whole atomic units of every offer's token, at most an upto offer's max_price where the
    schema bounds it; the offers take the rule (an offer's own fixed price beside it would be a second, different price)."""
    for field, code, message in sorted({p for t in terms for p in rule_problems(rule, spec.input_schema, t.decimals, t.maximum)}):
        src.issue(f"{at}.{field}", code, message)
    own = spec.offers is not None
    for index, offer in enumerate(spec.offers if spec.offers is not None else doc.offers):
        if offer.price is not None:
            where = f"{at}.offers[{index}].price" if own else f"offers[{index}].price"
            src.issue(where, "offer_price_on_rule",
                      f"{spec.name} is priced by a rule, which every offer charges: leave this offer's price out")


def _tool_terms(resolver: TermsResolver, spec: ToolDoc, at: str, src: Source) -> PaymentTerms | None:
    """The tool's effective terms, or None after reporting why not. A problem with a field the
    tool's own block writes is reported at that field; one its block only caused (a symbol of the
    catalog's unknown on the tool's network) at the block."""
    terms, coin, problems = resolver.resolve(spec.payment)
    written = spec.payment.model_fields_set if spec.payment is not None else set()
    for field, code, message in problems:
        src.issue(f"{at}.payment.{field}" if field in written else f"{at}.payment", code, message)
    if terms is None:
        return None
    problem = dollar_problem(spec.amount, terms, coin)
    if problem is not None:
        src.issue(f"{at}.price", "dollar_price_not_usd", problem)
        return None
    return terms


def _check_unique(
    doc: CatalogDoc, index: int, names: dict[str, int], routes: dict[_RouteShape, int], src: Source
) -> None:
    """Within one file, a tool's name and its route (method and path shape) are its own."""
    spec, at = doc.tools[index], f"tools[{index}]"
    if spec.name in names:
        src.issue(f"{at}.name", "duplicate_tool", f"tool name {spec.name!r} is already used by tools[{names[spec.name]}]")
    names.setdefault(spec.name, index)
    shape = route_shape(spec.method, spec.path)
    if shape in routes:
        other = doc.tools[routes[shape]]
        src.issue(
            f"{at}.path", "duplicate_route",
            f"route {spec.method} {spec.path} collides with tools[{routes[shape]}] ({other.name}: {other.method} {other.path})",
        )
    routes.setdefault(shape, index)


def _check_tool(
    doc: CatalogDoc, spec: ToolDoc, at: str, upstream: Upstream | None, payment: PaymentTerms,
    upstream_path: str, settle: SettleMode, src: Source, rule: PriceRule | None = None,
) -> None:
    """A tool's checks against its resolved terms: the model's cross-field checks, the bridge's,
    the price ceilings, and a settle-after payment window long enough for the upstream."""
    for field, code, message in consistency_problems(
        path=spec.path, upstream_path=upstream_path, price=spec.amount,
        decimals=payment.decimals, input_schema=spec.input_schema,
    ):
        src.issue(f"{at}.{field}", code, message)
    for field, code, message in bridge_problems(
        kind=spec.kind, method=spec.method,
        input_schema=spec.input_schema, request=spec.request, soap=spec.soap,
    ):
        src.issue(f"{at}.{field}", code, message)
    for field, code, message in answers_problems(spec.answers, spec.output_schema, spec.input_schema):
        src.issue(f"{at}.{field}", code, message)
    for field, code, message in user_auth_problems(spec.user_auth, spec.wallet_accounts):
        src.issue(f"{at}.{field}", code, message)
    for field, code, message in reaccess_problems(spec.reaccess, spec.method, spec.side_effects, spec.usage is not None, rule is not None):
        src.issue(f"{at}.{field}", code, message)
    ceilings = [(m, w) for m, w in ((spec.max_price, f"{at}.max_price"), (doc.max_price, "max_price")) if m is not None]
    for ceiling, where in ceilings:
        if spec.amount > ceiling:
            src.issue(f"{at}.price", "price_above_max", f"price {spec.amount:f} is above {where} {ceiling:f}")
    if spec.refund_on is not None and settle == "after":
        src.issue(f"{at}.refund_on", "refund_on_needs_upfront", "refund_on applies to settle: upfront tools only (a settle-after tool's failed call is not charged)")
    if upstream is not None and payment.max_timeout_seconds < (window := _payment_window(upstream, settle)):
        worst = f"the upstream's worst case {max_call_seconds(upstream):g}s + " if settle == "after" else ""
        src.issue(
            f"{at}.settle", "payment_window_too_short",
            f"settle: {settle} needs max_timeout_seconds >= {window} ({worst}{SETTLE_MARGIN_SECONDS}s to settle), got "
            f"{payment.max_timeout_seconds}; raise it" + (", or settle: upfront" if settle == "after" else ""),
        )


def _tool(
    doc: CatalogDoc, spec: ToolDoc, upstream: Upstream, payment: PaymentTerms,
    upstream_path: str, settle: SettleMode, source: str, alternatives: tuple[PaymentOffer, ...] = (),
    rule: PriceRule | None = None,
) -> Tool:
    # Not validated again: every field comes from ``ToolDoc`` (the same annotated types, already checked), the resolved
    # upstream and terms are validated models, and ``Tool``'s cross-field check is the ``consistency_problems`` just run.
    return Tool.model_construct(
        owner=doc.owner, name=spec.name, description=spec.description, method=spec.method,
        path=spec.path, upstream=upstream, upstream_path=upstream_path,
        price=spec.amount if type(spec.amount) is Decimal else Decimal(spec.amount),
        settle=settle, refund_on=spec.refund_on or "upstream_fault", side_effects=spec.side_effects, payment=payment,
        input_schema=spec.input_schema,
        output_schema=spec.output_schema, max_price=spec.max_price, budgets=spec.budgets,
        rate_limits=spec.rate_limits,
        kind=spec.kind, request=spec.request, soap=spec.soap.anchored(source) if spec.soap else None,
        retry=spec.retry, failure_when=spec.failure_when, alternatives=alternatives, answers=spec.answers,
        user_auth=spec.user_auth, wallet_accounts=spec.wallet_accounts, reaccess=spec.reaccess, price_rule=rule,
        usage=spec.usage, stream=spec.stream,
    )


def _pick_upstream(spec: ToolDoc, upstreams: dict[str, Upstream], at: str, src: Source) -> Upstream | None:
    if spec.upstream is None:
        if len(upstreams) == 1:
            return next(iter(upstreams.values()))
        src.issue(f"{at}.upstream", "upstream_required",
                  f"this catalog has several upstreams ({', '.join(sorted(upstreams))}); name one")
        return None
    if spec.upstream not in upstreams:
        src.issue(f"{at}.upstream", "unknown_upstream",
                  f"unknown upstream {spec.upstream!r}; defined: {', '.join(sorted(upstreams))}")
        return None
    return upstreams[spec.upstream]


def _parse(text: str, source_name: str, local: LocalTokens = None, env: Environment = None) -> tuple[Catalog | None, Source]:
    src = Source(source_name)
    data = src.parse(text)
    if src.issues:
        return None, src
    if data is None:
        src.issue("", "empty_catalog", "the file is empty")
        return None, src
    sources: dict[str, tuple[str, ...]] = {}
    if needs_interpolation(text):  # before validation: what the environment gives is validated as written
        data, sources = interpolate(data, env or {}, src.issue)
        if src.issues:
            return None, src
    try:
        doc = CatalogDoc.model_validate(data, context={SHARED_SCHEMAS: {}})
    except ValidationError as exc:
        src.add_validation_errors(exc)
        doc = None
    catalog = _resolve(doc, src, local) if doc is not None else None
    if sources and src.issues:
        src.issues = [replace(i, message=i.message + variables_note(i.path, sources)) for i in src.issues]
    return catalog, src


def _read(path: str | os.PathLike[str], local: LocalTokens = None, env: Environment = None) -> tuple[Catalog | None, Source]:
    name = os.fspath(path)
    try:
        text = read_catalog_text(name)
    except FileNotFoundError:
        src = Source(name)
        src.issue("", "file_not_found", "no such file")
        return None, src
    except (OSError, UnicodeDecodeError) as exc:
        src = Source(name)
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or type(exc).__name__)
        src.issue("", "file_unreadable", f"cannot read the file: {reason}", line=None)
        return None, src
    return _parse(text, name, local, env)


def _fixed_lines(src: Source) -> list[CatalogIssue]:
    return sorted(src.issues, key=lambda i: (i.line or 0))


def _without_cyclic_gc(load: Callable[_P, _T]) -> Callable[_P, _T]:
    """A large load makes a million short-lived objects (YAML events and their marks, the data, the
    models) and keeps no reference cycles; the cyclic collector, set off by the allocations alone,
    would walk the growing heap again and again: more than half the load time of a large catalog.
    It is off during a load and back on after; reference counting frees everything as usual."""

    @functools.wraps(load)
    def without(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if not gc.isenabled():
            return load(*args, **kwargs)
        gc.disable()
        try:
            return load(*args, **kwargs)
        finally:
            gc.enable()

    return without


@_without_cyclic_gc
def parse_catalog(
    text: str, source_name: str = "<catalog>", *, local: LocalTokens = None, env: Environment = None
) -> Catalog:
    catalog, src = _parse(text, source_name, local, env)
    if catalog is None:
        raise CatalogError(_fixed_lines(src))
    return catalog


@_without_cyclic_gc
def load_catalog(path: str | os.PathLike[str], *, local: LocalTokens = None, env: Environment = None) -> Catalog:
    catalog, src = _read(path, local, env)
    if catalog is None:
        raise CatalogError(_fixed_lines(src))
    return catalog


@_without_cyclic_gc
def load_catalogs(
    paths: Iterable[str | os.PathLike[str]], *, local: LocalTokens = None, env: Environment = None
) -> Catalogs:
    """Load several owners' files; every file is checked, and all issues are raised together.
    ``local``: the stablecoins of the local chain as its deployment file has them; ``env``: the
    environment ``${NAME}`` in the files reads (none given: only ``${NAME:-default}`` resolves)."""
    issues: list[CatalogIssue] = []
    read: list[tuple[Catalog, Source]] = []
    files = list(paths)
    for path in files:
        catalog, src = _read(path, local, env)
        if catalog is None:
            issues.extend(_fixed_lines(src))
            continue
        read.append((catalog, src))
    if len(files) > 1:  # within one file, names, routes and upstreams were checked by the load
        across_files(read)
    for _, src in read:
        issues.extend(_fixed_lines(src))
    loaded = [catalog for catalog, _ in read]
    if issues:
        raise CatalogError(issues)
    if not loaded:
        raise CatalogError([CatalogIssue("<catalogs>", "", None, "no catalog files given", "no_catalogs")])
    return Catalogs(catalogs=tuple(loaded))


def price_ceiling_issues(catalogs: Catalogs, ceiling: Decimal, setting: str = "X402GW_MAX_PRICE") -> list[CatalogIssue]:
    """Tools priced above a gateway-wide ceiling, as issues pointing at the price's line."""
    issues: list[CatalogIssue] = []
    for catalog in catalogs.catalogs:
        src: Source | None = None
        for index, tool in enumerate(catalog.tools):
            if tool.price <= ceiling:
                continue
            if src is None:
                try:
                    src = Source(catalog.source, Path(catalog.source).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    src = Source(catalog.source)  # no line numbers: the issue still names the tool
            at = f"tools[{index}].price"
            issues.append(CatalogIssue(
                catalog.source, at, src.line(at), f"price {tool.price:f} of {tool.name} is above {setting} {ceiling:f}",
                "price_above_max",
            ))
    return issues
