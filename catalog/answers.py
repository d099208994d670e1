"""What a tool's answers may be made into: trimmed to a caller's budget, and checked against its schema.

Catalog syntax (a tool's ``answers:`` block; no block: answers pass through untouched)::

    answers:
      trim: true           # callers may ask for fields (JMESPath), a maximum of items per array and
                           # a token budget: the x402gw_fields, x402gw_max_items and
                           # x402gw_token_budget query parameters (gateway.upstream.trimming)
      max_items: 20        # default item limit for every array of the answer, when the caller gives none
      token_budget: 2000   # default token budget, when the caller gives none
      drift: fail          # the answer is checked against output_schema: pass (record only) or fail
                           # (not served, not charged; a refund owed when settled upfront)

The price never depends on what is asked: a trimmed answer costs what the whole answer costs.
``max_items`` and ``token_budget`` need ``trim: true``; ``drift`` needs an ``output_schema``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["MAX_ITEMS_LIMIT", "RESERVED_PREFIX", "TOKEN_BUDGET_LIMIT", "Answers", "DriftHandling", "answers_problems"]

DriftHandling = Literal["pass", "fail"]
# Query parameters (and MCP arguments) with this prefix are the gateway's, never a tool's argument.
RESERVED_PREFIX = "x402gw_"
MAX_ITEMS_LIMIT = 100_000  # the highest item limit a catalog or a caller may give
TOKEN_BUDGET_LIMIT = 10_000_000  # the highest token budget a catalog or a caller may give


def _fail(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{detail}", {"detail": message})


def _count(low: int, high: int, what: str) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail("invalid_value", f"{what} must be an integer {low}..{high}, got {value!r}")
        return value

    return check


def _drift(value: Any) -> str:
    if value not in ("pass", "fail"):
        raise _fail("invalid_drift", f"drift must be pass (record only) or fail (not served, not charged), got {value!r}")
    return str(value)


class Answers(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trim: bool = False
    max_items: Annotated[int, BeforeValidator(_count(0, MAX_ITEMS_LIMIT, "max_items"))] | None = None
    token_budget: Annotated[int, BeforeValidator(_count(1, TOKEN_BUDGET_LIMIT, "token_budget"))] | None = None
    drift: Annotated[DriftHandling, BeforeValidator(_drift)] | None = None

    @model_validator(mode="after")
    def _defaults_need_trim(self) -> Answers:
        given = [name for name in ("max_items", "token_budget") if getattr(self, name) is not None]
        if given and not self.trim:
            raise _fail("trim_required", f"{' and '.join(given)} trim the answer: write trim: true beside it")
        return self


def answers_problems(
    answers: Answers | None, output_schema: dict[str, Any] | None, input_schema: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """Cross-field checks of a tool's answers block, as ``(field, code, message)`` under the tool;
    and the reserved argument names (the gateway's own query parameters), whatever the block."""
    problems: list[tuple[str, str, str]] = []
    if answers is not None and answers.drift is not None and not output_schema:
        problems.append(("answers.drift", "output_schema_required",
                         "drift checks the answer against the tool's output_schema: write one, or leave drift out"))
    properties = input_schema.get("properties")
    reserved = sorted(name for name in properties if name.startswith(RESERVED_PREFIX)) if isinstance(properties, dict) else []
    if reserved:
        problems.append(("input_schema", "reserved_argument",
                         f"argument(s) {', '.join(reserved)}: names starting with {RESERVED_PREFIX} are the gateway's own"))
    return problems
