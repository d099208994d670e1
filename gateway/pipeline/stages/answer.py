"""Stage ``answer``, after ``bridge`` and before ``settle``: the upstream's good answer checked and sized.

Reads ``Paid.upstream``; writes ``ctx.drift`` and, when the caller asked (``ctx.answer_request``),
the trimmed answer in its place with ``X402GW-Trimmed`` saying what was cut (``settle`` stores and
serves that, so a replay is the same answer). An answer that does not match the tool's
``output_schema`` (``answers.drift``) is recorded (audit ``upstream_schema_drift``, the metric) and,
under ``fail``, withheld: a ``settle: after`` payment is voided (nothing charged), an ``upfront``
one (settled before the call) is owed a refund and its answer is never stored; either way a 502
``upstream_schema_drift``. Nothing here talks to the upstream or moves money.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from jsonschema import Draft202012Validator
from starlette.responses import Response

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import X402GW_TRIMMED
from gateway.pipeline.context import RequestContext
from gateway.pipeline.refunds import Refunds
from gateway.protocol.receipts import receipt_headers
from gateway.upstream.bridge import UpstreamResponse
from gateway.upstream.trimming import AnswerRequest, trim
from settlement.ledger import Ledger

__all__ = ["CheckAnswer", "drift_problems", "parse_answer", "trimmed_answer"]

_NOT_JSON = object()
_PROBLEMS_KEPT = 5
# Headers that describe the upstream's bytes: wrong once the body is trimmed.
_BODY_HEADERS = frozenset({"etag", "content-md5", "digest", "content-range", "last-modified"})


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _NOT_JSON


def drift_problems(validator: Draft202012Validator, document: Any) -> list[dict[str, str]]:
    """Where ``document`` departs from the schema: a JSON pointer and the schema keyword for each
    (the first few), never the upstream's values."""
    if document is _NOT_JSON:
        return [{"at": "", "keyword": "type", "problem": "the answer is not JSON"}]
    problems: list[dict[str, str]] = []
    for error in validator.iter_errors(document):
        pointer = "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in error.absolute_path)
        problems.append({"at": pointer, "keyword": str(error.validator), "problem": _problem(error.validator, error.validator_value)})
        if len(problems) >= _PROBLEMS_KEPT:
            break
    return problems


def _problem(keyword: Any, expected: Any) -> str:
    if keyword == "required":
        return f"a required field is missing (one of {', '.join(map(str, expected))[:120]})"
    if keyword == "type":
        return f"expected {expected}"[:120]
    return f"fails {keyword}"


def parse_answer(body: bytes) -> Any:
    """The answer's JSON document, or a marker ``drift_problems`` and ``trimmed_answer`` read as not JSON."""
    return _parse(body)


def trimmed_answer(upstream: UpstreamResponse, wanted: AnswerRequest, document: Any) -> UpstreamResponse:
    """``upstream`` trimmed as the caller asked, ``X402GW-Trimmed`` saying what was cut."""
    if document is _NOT_JSON:
        note, body = "unparsed", upstream.body
    else:
        trimmed = trim(wanted, upstream.body, document)
        note, body = trimmed.describe(), trimmed.body
    headers = [(k, v) for k, v in upstream.headers if k.lower() not in _BODY_HEADERS or body is upstream.body]
    return UpstreamResponse(upstream.status, [*headers, (X402GW_TRIMMED, note)], body)


class CheckAnswer:
    name = "answer"
    shape_only = False

    def __init__(self, ledger: Ledger, refunds: Refunds) -> None:
        self.ledger = ledger
        self.refunds = refunds

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, compiled, paid = ctx.tool, ctx.compiled, ctx.paid
        assert tool is not None and compiled is not None and paid is not None and paid.upstream is not None
        validator, wanted = compiled.output_validator, ctx.answer_request
        if (validator is None and (wanted is None or not wanted.trims)) or ctx.method == "HEAD" or tool.stream:
            return None
        upstream = paid.upstream
        document = _parse(upstream.body)
        if validator is not None:
            problems = drift_problems(validator, document)
            if problems:
                await self._drifted(ctx, problems)
        if wanted is not None and wanted.trims:
            paid.upstream = trimmed_answer(upstream, wanted, document)
        return None

    async def _drifted(self, ctx: RequestContext, problems: list[dict[str, str]]) -> None:
        """Record the drift; under ``fail``, withhold the answer: nothing charged, or a refund owed."""
        tool, quote, payment_id = ctx.tool, ctx.quote, ctx.payment_id
        assert tool is not None and tool.answers is not None and quote is not None and payment_id is not None
        handling = ctx.drift = tool.answers.drift or "pass"
        status = ctx.upstream_status
        ctx.record("upstream_schema_drift", handling=handling, paymentId=payment_id, upstreamStatus=status, problems=problems)
        if handling == "pass":
            return
        error = GatewayError(
            codes.UPSTREAM_SCHEMA_DRIFT,
            "the upstream's answer does not match the tool's output schema; it is not served and not charged",
            status=502, retryable=False, upstreamStatus=status, problems=problems,
        )
        if tool.settle == "upfront":
            ctx.record("upstream_answer_withheld", paymentId=payment_id, upstreamStatus=status, reason=codes.UPSTREAM_SCHEMA_DRIFT)
            refund = await self.refunds.owe(ctx, quote, payment_id, codes.UPSTREAM_SCHEMA_DRIFT)
            assert ctx.settlement is not None
            error.headers.update(receipt_headers(ctx.settlement, quote.version))
            error.fields.update(refund)
            error.message = "the upstream's answer does not match the tool's output schema; it is not served and a refund is owed"
        else:
            await self.ledger.run(self.ledger.void, payment_id, codes.UPSTREAM_SCHEMA_DRIFT, upstream_status=status)
            ctx.outcome = "upstream_error"
        raise error
