"""Answers sized to a caller's budget: what a caller may ask of a tool's JSON answer, and the trimming.

A tool whose catalog says ``answers: {trim: true}`` (``catalog.answers``) takes three query
parameters of the gateway's own, never passed to the upstream::

    x402gw_fields=items[*].{name: name, price: price}   a JMESPath projection (no functions)
    x402gw_max_items=5                                    every array of the answer cut to 5 items
    x402gw_token_budget=800                               arrays cut evenly until the answer fits

``answer_request`` reads them when the arguments are read, before any 402, so a malformed one is a
400 that costs nothing: ``answer_fields_invalid`` with the ``position`` of the error in the
expression, ``answer_limit_invalid``, ``answer_parameter_invalid`` (an unknown ``x402gw_`` name,
or one given twice) and ``answer_trimming_not_offered`` (a tool without ``trim: true``). They are
part of the query, so of the request a payment is bound to and of the fingerprint a replay must
match: a payment made for one projection is never served for another.

``trim`` applies them, in that order, to the upstream's JSON answer and says what it did in the
``X402GW-Trimmed`` header (``describe``). Tokens are estimated as the compact JSON's length / 3,
rounded up (as tool search does). A projection is evaluated with a cost allowance (every node
visited and every item built counts; a caller's expression cannot make the gateway build more
than a few times the answer): one over it, or one that fails on this answer, is not applied and
the header says so; the limits still apply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_plus

from jmespath import exceptions as jmespath_errors
from jmespath.lexer import Lexer
from jmespath.parser import ParsedResult, Parser
from jmespath.visitor import TreeInterpreter

from catalog import Tool
from catalog.answers import MAX_ITEMS_LIMIT, RESERVED_PREFIX, TOKEN_BUDGET_LIMIT
from gateway import codes
from gateway.errors import GatewayError
from gateway.upstream.documents import dumps

__all__ = [
    "FIELDS",
    "MAX_EXPRESSION_CHARS",
    "MAX_ITEMS",
    "TOKEN_BUDGET",
    "AnswerRequest",
    "Trimmed",
    "answer_parameters",
    "answer_request",
    "estimate_tokens",
    "trim",
]

FIELDS = RESERVED_PREFIX + "fields"
MAX_ITEMS = RESERVED_PREFIX + "max_items"
TOKEN_BUDGET = RESERVED_PREFIX + "token_budget"
MAX_EXPRESSION_CHARS = 512
MAX_EXPRESSION_NODES = 128
CHARS_PER_TOKEN = 3
# Token types of the subset taken: JMESPath less functions and expression references.
_FUNCTION_TOKENS = frozenset({"expref"})


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """What this request asks of the answer (the caller's parameters, else the catalog's defaults)."""

    fields: str | None = None
    projection: ParsedResult | None = field(default=None, compare=False, repr=False)
    max_items: int | None = None
    token_budget: int | None = None
    upstream_query: str = ""  # the request's query less the x402gw_ parameters: what the upstream gets

    @property
    def trims(self) -> bool:
        return self.fields is not None or self.max_items is not None or self.token_budget is not None


def answer_parameters(tool: Tool) -> dict[str, dict[str, Any]]:
    """The JSON schemas of the parameters ``tool`` takes (none without ``trim: true``): what
    discovery adds to the tool's parameters."""
    answers = tool.answers
    if answers is None or not answers.trim:
        return {}
    items = f" (default {answers.max_items})" if answers.max_items is not None else ""
    budget = f" (default {answers.token_budget})" if answers.token_budget is not None else ""
    return {
        FIELDS: {"type": "string", "maxLength": MAX_EXPRESSION_CHARS,
                 "description": "Gateway: keep only this JMESPath projection of the answer (no functions), "
                                "e.g. items[*].{name: name, price: price}. Same price."},
        MAX_ITEMS: {"type": "integer", "minimum": 0, "maximum": MAX_ITEMS_LIMIT,
                    "description": f"Gateway: cut every array of the answer to this many items{items}. Same price."},
        TOKEN_BUDGET: {"type": "integer", "minimum": 1, "maximum": TOKEN_BUDGET_LIMIT,
                       "description": f"Gateway: cut the answer's arrays until it fits this many tokens "
                                     f"(JSON characters / 3){budget}. Same price."},
    }


def _refuse(code: str, message: str, **fields: Any) -> GatewayError:
    return GatewayError(code, message, status=400, **fields)


def _integer(name: str, text: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _refuse(codes.ANSWER_LIMIT_INVALID, f"{name} must be an integer {low}..{high}", parameter=name)
    return int(text)


def answer_request(
    tool: Tool, pairs: list[tuple[str, str]], query: str
) -> tuple[AnswerRequest | None, list[tuple[str, str]]]:
    """The request's ``x402gw_`` parameters read and checked (a GatewayError 400 otherwise), and the
    query's other pairs: the tool's arguments. None: the answer is passed on untouched."""
    reserved = [(name, value) for name, value in pairs if name.startswith(RESERVED_PREFIX)]
    answers = tool.answers
    if not reserved and (answers is None or not answers.trim):
        return None, pairs
    if answers is None or not answers.trim:
        raise _refuse(codes.ANSWER_TRIMMING_NOT_OFFERED,
                      f"{tool.name} answers in full: it takes no {RESERVED_PREFIX} parameters", parameter=reserved[0][0])
    given: dict[str, str] = {}
    for name, value in reserved:
        if name not in (FIELDS, MAX_ITEMS, TOKEN_BUDGET) or name in given:
            problem = "is given twice" if name in given else f"is not one of {FIELDS}, {MAX_ITEMS}, {TOKEN_BUDGET}"
            raise _refuse(codes.ANSWER_PARAMETER_INVALID, f"{name[:64]} {problem}", parameter=name[:64])
        given[name] = value
    fields = given.get(FIELDS)
    max_items = given.get(MAX_ITEMS)
    budget = given.get(TOKEN_BUDGET)
    request = AnswerRequest(
        fields=fields,
        projection=compile_projection(fields) if fields is not None else None,
        max_items=_integer(MAX_ITEMS, max_items, 0, MAX_ITEMS_LIMIT) if max_items is not None else answers.max_items,
        token_budget=_integer(TOKEN_BUDGET, budget, 1, TOKEN_BUDGET_LIMIT) if budget is not None else answers.token_budget,
        upstream_query=_without_reserved(query) if reserved else query,
    )
    rest = [(name, value) for name, value in pairs if not name.startswith(RESERVED_PREFIX)] if reserved else pairs
    return request, rest


def _without_reserved(query: str) -> str:
    """The raw query less its ``x402gw_`` pairs, the others as the caller encoded them."""
    kept = [part for part in query.split("&") if not unquote_plus(part.partition("=")[0]).startswith(RESERVED_PREFIX)]
    return "&".join(kept)


def _invalid_fields(position: int, problem: str) -> GatewayError:
    return _refuse(
        codes.ANSWER_FIELDS_INVALID,
        f"{FIELDS} is not a JMESPath projection the gateway takes: {problem} at position {position}",
        parameter=FIELDS, position=position, problem=problem,
    )


def compile_projection(expression: str) -> ParsedResult:
    """``expression`` parsed, or a GatewayError naming the position (0-based) of its first error."""
    if not expression.strip():
        raise _invalid_fields(0, "the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _invalid_fields(MAX_EXPRESSION_CHARS, f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tokens: list[Any] = list(Lexer().tokenize(expression))
        parsed = Parser().parse(expression)
    except jmespath_errors.LexerError as exc:
        raise _invalid_fields(int(exc.lexer_position), str(exc.message)) from None
    except jmespath_errors.IncompleteExpressionError as exc:
        raise _invalid_fields(int(exc.lex_position), "the expression ends too soon") from None
    except jmespath_errors.ParseError as exc:
        raise _invalid_fields(int(exc.lex_position), str(exc.msg)) from None
    except jmespath_errors.JMESPathError:
        raise _invalid_fields(0, "not a JMESPath expression") from None
    except RecursionError:  # "!" * 511 + "a": the parser recurses once a level
        raise _invalid_fields(0, "nested too deeply") from None
    _check_subset(tokens)
    if _count_nodes(parsed.parsed) > MAX_EXPRESSION_NODES:
        raise _invalid_fields(0, f"more than {MAX_EXPRESSION_NODES} terms")
    return parsed


def _check_subset(tokens: list[Any]) -> None:
    """No function calls or expression references (they could build without bound), no zero step."""
    colons = [0]
    for index, token in enumerate(tokens):
        kind = token["type"]
        following = tokens[index + 1]["type"] if index + 1 < len(tokens) else "eof"
        if kind in _FUNCTION_TOKENS or kind == "unquoted_identifier" and following == "lparen":
            raise _invalid_fields(int(token["start"]), f"functions are not taken ({token['value']!s:.32})")
        if kind in ("lbracket", "filter", "flatten"):
            colons.append(0)
        elif kind == "rbracket" and len(colons) > 1:
            colons.pop()
        elif kind == "colon":
            colons[-1] += 1
        elif kind == "number" and token["value"] == 0 and colons[-1] == 2 and tokens[index - 1]["type"] == "colon":
            raise _invalid_fields(int(token["start"]), "a slice step cannot be 0")


def _count_nodes(node: Any) -> int:
    count, stack = 0, [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += 1
            stack.extend(child for child in item.get("children", ()) if isinstance(child, dict))
    return count


# -- applying a request to an answer -------------------------------------------------------------


class _TooCostly(Exception):
    pass


class _Bounded(TreeInterpreter):
    """JMESPath's interpreter with an allowance: each node visited, and each item of every list or
    object it builds, spends one; a flatten is charged before it builds its list."""

    def __init__(self, allowance: int) -> None:
        super().__init__()
        self.left = allowance

    def _spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise _TooCostly

    def visit(self, node: Any, *args: Any, **kwargs: Any) -> Any:
        self._spend(1)
        result = super().visit(node, *args, **kwargs)
        if isinstance(result, (list, dict)):
            self._spend(len(result))
        return result

    def visit_flatten(self, node: Any, value: Any) -> Any:
        base = self.visit(node["children"][0], value)
        if isinstance(base, list):
            self._spend(sum(len(element) if isinstance(element, list) else 1 for element in base))
        literal: Any = {"type": "flatten", "children": [{"type": "literal", "value": base, "children": []}]}
        return super().visit_flatten(literal, value)


@dataclass
class Trimmed:
    """What ``trim`` made of one answer: the body to serve and what was done, for the header."""

    body: bytes
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(self.notes)


def estimate_tokens(size: int) -> int:
    return max(1, math.ceil(size / CHARS_PER_TOKEN))


def trim(request: AnswerRequest, body: bytes, document: Any) -> Trimmed:
    """``document`` (the answer parsed, exact decimals) made what ``request`` asks; ``body`` is
    the answer as the upstream sent it, served as it is when nothing could be done to it."""
    result = Trimmed(body)
    value = document
    if request.projection is not None:
        value, note = _project(request.projection, document, len(body))
        result.notes.append(note)
    if request.max_items is not None:
        arrays, dropped = _cap(value, request.max_items)
        result.notes.append(f"max-items={request.max_items};arrays={arrays};dropped={dropped}")
    if request.token_budget is not None:
        result.notes.append(_fit(value, request.token_budget))
    result.body = dumps(value)
    return result


def _project(projection: ParsedResult, document: Any, size: int) -> tuple[Any, str]:
    allowance = 100_000 + 2 * size
    interpreter = _Bounded(allowance)
    try:
        value = interpreter.visit(projection.parsed, document)
        if _size(value, None, limit=2 * size + 65_536) is None:
            raise _TooCostly
    except _TooCostly:
        return document, 'fields=?0;error="projection_too_costly"'
    except (jmespath_errors.JMESPathError, ValueError, TypeError):
        return document, 'fields=?0;error="projection_failed"'
    return _unshared(value), "fields"


def _unshared(value: Any) -> Any:
    """A projection's result may hold one list or object in several places: copied where it
    repeats, so cutting one place does not cut the others."""
    seen: set[int] = set()
    root = [value]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        item = parent[key]
        if not isinstance(item, (list, dict)):
            continue
        if id(item) in seen:
            item = parent[key] = json.loads(dumps(item), parse_float=Decimal)
        seen.add(id(item))
        keys = range(len(item)) if isinstance(item, list) else list(item)
        stack.extend((item, k) for k in keys)
    return root[0]


def _arrays(value: Any) -> list[list[Any]]:
    found: list[list[Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            found.append(item)
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _cap(value: Any, limit: int) -> tuple[int, int]:
    """Every array of ``value`` cut to ``limit`` items, in place: (arrays cut, items dropped)."""
    arrays = dropped = 0
    stack = [value]
    while stack:  # top down: what an array cut drops is not counted again inside it
        item = stack.pop()
        if isinstance(item, list):
            if len(item) > limit:
                arrays += 1
                dropped += len(item) - limit
                del item[limit:]
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return arrays, dropped


def _fit(value: Any, budget: int) -> str:
    """Arrays cut evenly (the most items every array may keep) until ``value`` fits ``budget``."""
    size = _size(value, None)
    assert size is not None
    if estimate_tokens(size) <= budget:
        return f"token-budget={budget};arrays=0;dropped=0;tokens={estimate_tokens(size)}"
    low, high = 0, max((len(array) for array in _arrays(value)), default=0)
    while low < high:  # the largest cap that fits (0 when none does)
        middle = (low + high + 1) // 2
        fits = _size(value, middle)
        assert fits is not None
        low, high = (middle, high) if estimate_tokens(fits) <= budget else (low, middle - 1)
    arrays, dropped = _cap(value, low)
    tokens = estimate_tokens(len(dumps(value)))
    over = ";over" if tokens > budget else ""
    return f"token-budget={budget};items={low};arrays={arrays};dropped={dropped};tokens={tokens}{over}"


def _scalar_size(item: Any) -> int:
    if isinstance(item, Decimal):
        return len(str(item))
    return len(json.dumps(item))


def _size(value: Any, cap: int | None, limit: int | None = None) -> int | None:
    """The length of ``dumps(value)`` were every array cut to ``cap`` items; None past ``limit``."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            kept = item if cap is None else item[:cap]
            total += 1 + max(len(kept), 1)  # brackets and commas
            stack.extend(kept)
        elif isinstance(item, dict):
            total += 1 + max(len(item), 1)
            total += sum(_scalar_size(key) + 1 for key in item)  # each key and its colon
            stack.extend(item.values())
        else:
            total += _scalar_size(item)
        if limit is not None and total > limit:
            return None
    return total

