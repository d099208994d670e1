"""What a request to one tool needs, built once per tool and kept (offer, argument validator, price)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from jsonschema import Draft202012Validator

from catalog import PaymentTerms, Tool, format_amount
from gateway.protocol.offers import Offer
from settlement.schemes.exact import exact_requirements
from settlement.x402.wire import PaymentRequirements

__all__ = ["CompiledTool"]


@dataclass(frozen=True, eq=False)
class CompiledTool:
    """What a request to one tool needs: its offer, argument validator and price text. Each is built
    on first use and kept, so a catalog of thousands of tools starts without compiling them all
    and the first request to a tool pays its build once. Tools with the same input schema share
    one validator (``validators``, one dict per pipeline)."""

    tool: Tool
    validators: dict[str, Draft202012Validator] = field(default_factory=dict, repr=False)
    # The offer's requirements from the tool's terms and price: the pipeline's ``Schemes.requirements``.
    scheme_requirements: Callable[[PaymentTerms, int], PaymentRequirements] = exact_requirements

    @cached_property
    def offer(self) -> Offer:
        tool, requirements = self.tool, self.scheme_requirements
        alternatives = [requirements(offer.terms, offer.price_atomic) for offer in tool.alternatives]
        return Offer.for_tool(tool, requirements(tool.payment, tool.price_atomic), alternatives)

    @cached_property
    def validator(self) -> Draft202012Validator:
        schema = self.tool.input_schema
        key = json.dumps(schema, default=repr)  # in the schema's own key order: errors come in it
        validator = self.validators.get(key)
        if validator is None:
            validator = self.validators[key] = Draft202012Validator(schema)
        return validator

    @cached_property
    def output_validator(self) -> Draft202012Validator | None:
        """The tool's output_schema compiled once (answers.drift checks every answer against it)."""
        schema = self.tool.output_schema
        if not schema or self.tool.answers is None or self.tool.answers.drift is None:
            return None
        key = "output:" + json.dumps(schema, default=repr)
        validator = self.validators.get(key)
        if validator is None:
            validator = self.validators[key] = Draft202012Validator(schema)
        return validator

    @cached_property
    def price_text(self) -> str:
        return format_amount(self.tool.price_atomic, self.tool.payment.decimals)
