"""What happens to a request: the chain of stages (``chain``), its runner and the unpaid fast path.

The per-request vocabulary (``RequestContext``, ``Stage``...) is imported eagerly; the rest on first
use, because ``gateway.safety`` (which the stages call) itself reads ``gateway.pipeline.context``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from gateway.pipeline.context import Finalizer, Observer, Paid, RequestContext, Stage

if TYPE_CHECKING:
    from gateway.pipeline.chain import Chain, build_chain
    from gateway.pipeline.compiled import CompiledTool
    from gateway.pipeline.fastpath import UnpaidFastPath
    from gateway.pipeline.pipeline import Pipeline

__all__ = [
    "Chain",
    "CompiledTool",
    "Finalizer",
    "Observer",
    "Paid",
    "Pipeline",
    "RequestContext",
    "Stage",
    "UnpaidFastPath",
    "build_chain",
]

_LAZY = {
    "Chain": "gateway.pipeline.chain",
    "build_chain": "gateway.pipeline.chain",
    "CompiledTool": "gateway.pipeline.compiled",
    "UnpaidFastPath": "gateway.pipeline.fastpath",
    "Pipeline": "gateway.pipeline.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
