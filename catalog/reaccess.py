"""Re-access: a payer who bought a tool's answer gets it again, free, for a while, by signing in.

Catalog syntax (a tool's ``reaccess:`` block; no block: every call is paid)::

    reaccess:
      window: 1h        # how long after the payment (30s, 5m, 1h, 1d or seconds; at most 30 days)
      match: request    # request (default): the same tool with the same arguments (method, path,
                        # query and body as paid: the stored answer is served again, the upstream
                        # is not called); tool: any call of the same tool (the upstream is called)

The payer proves it is the address that paid by signing the 402's sign-in-with-x challenge
(EIP-4361); the proof is checked in ``gateway.pipeline.stages.reaccess``, the payment found in the
ledger. ``match: tool`` calls the upstream afresh for free, so it is refused on a tool with side
effects (a state-changing method, or ``side_effects: true``: ``reaccess_repeats_side_effects``) and
on a tool whose every call has its own cost (a ``usage:`` rule or a price rule over its arguments:
``reaccess_repeats_priced_calls``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

from catalog.limits import parse_window

__all__ = ["MAX_REACCESS_WINDOW_SECONDS", "Reaccess", "ReaccessMatch", "reaccess_problems"]

MAX_REACCESS_WINDOW_SECONDS = 30 * 86_400
ReaccessMatch = Literal["request", "tool"]
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _window(value: Any) -> int:
    try:
        seconds = parse_window(value)
    except ValueError as exc:
        raise PydanticCustomError("invalid_window", "{detail}", {"detail": str(exc)}) from None
    if seconds > MAX_REACCESS_WINDOW_SECONDS:
        raise PydanticCustomError("invalid_window", "{detail}", {"detail": f"a re-access window is at most 30d, got {value!r}"})
    return seconds


def _match(value: Any) -> str:
    if value not in ("request", "tool"):
        raise PydanticCustomError(
            "invalid_match", "{detail}",
            {"detail": f"match must be request (same tool and arguments) or tool (any call of the tool), got {value!r}"},
        )
    return str(value)


class Reaccess(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window: Annotated[int, BeforeValidator(_window)]  # seconds
    match: Annotated[ReaccessMatch, BeforeValidator(_match)] = "request"


def reaccess_problems(
    reaccess: Reaccess | None, method: str, side_effects: bool, usage: bool = False, price_rule: bool = False,
) -> list[tuple[str, str, str]]:
    """Cross-field checks of a tool's reaccess block, as ``(field, code, message)`` under the tool.
    ``usage``: the tool is charged by a ``usage:`` rule; ``price_rule``: priced by its arguments."""
    if reaccess is None or reaccess.match != "tool":
        return []
    if method.upper() in _STATE_CHANGING or side_effects:
        return [("reaccess.match", "reaccess_repeats_side_effects",
                 "match: tool calls the upstream again for free, so only a tool without side effects may have it; "
                 "use match: request (the stored answer is served again)")]
    if usage or price_rule:
        cost = "is charged by the usage its answer reports" if usage else "is priced by its arguments"
        return [("reaccess.match", "reaccess_repeats_priced_calls",
                 f"match: tool calls the upstream again for free, but this tool {cost}: each call has its own cost, "
                 "which one payment does not cover; use match: request (the stored answer is served again)")]
    return []
