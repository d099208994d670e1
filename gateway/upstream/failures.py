"""An upstream answer that is a failure: ``UpstreamFailure``, and the catalog's failure rules
(``failure_when``), compiled once per tool and checked against each answer."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from catalog.bridge import FailureRule
from gateway.errors import GatewayError
from gateway.upstream.answers import _MESSAGE_LIMIT
from gateway.upstream.credentials import Credentials
from gateway.upstream.documents import MISSING as _MISSING
from gateway.upstream.documents import resolve_pointer
from gateway.upstream.documents import text as _text
from gateway.upstream.documents import xpath_value as _xpath_value
from gateway.upstream.soap import parse_xml
from gateway.upstream.transport import UpstreamResponse

__all__ = ["CompiledRule", "UpstreamFailure", "check_rules", "compile_rule"]

log = logging.getLogger("x402gw.bridge")


class UpstreamFailure(GatewayError):
    """The upstream answered, and the answer is a failure (SOAP fault, catalog failure rule)."""


@dataclass(frozen=True)
class CompiledRule:
    rule: FailureRule
    xpath: etree.XPath | None


def compile_rule(rule: FailureRule) -> CompiledRule:
    """The rule with its XPath compiled; raises ``etree.XPathSyntaxError`` on an invalid one."""
    return CompiledRule(rule, etree.XPath(rule.xpath, smart_strings=False) if rule.xpath else None)


def check_rules(
    rules: Iterable[CompiledRule], tool_name: str, credentials: Credentials, response: UpstreamResponse,
    document: Any, root: Any, *, xpath_only: bool = False, pointer_only: bool = False,
) -> None:
    """Raises ``UpstreamFailure`` for the first rule the answer matches: an XPath rule against the
    XML (``root``, or the body parsed), a pointer rule against the JSON ``document``."""
    for compiled in rules:
        rule = compiled.rule
        if (xpath_only and compiled.xpath is None) or (pointer_only and compiled.xpath is not None):
            continue
        if compiled.xpath is not None:
            tree = root if root is not None else parse_xml(response.body)
            if tree is None:
                continue
            found = compiled.xpath(tree)
            value = _xpath_value(found)
            matched = (value == _text(rule.equals)) if rule.has_equals else bool(found)
            detail = value
        else:
            if document is None:
                continue
            value = resolve_pointer(document, rule.pointer or "")
            matched = (value is not _MISSING and value == rule.equals) if rule.has_equals else value is not _MISSING
            detail = None
        if not matched:
            continue
        message = rule.message
        if message is None and rule.message_pointer is not None and document is not None:
            found_message = resolve_pointer(document, rule.message_pointer)
            message = None if found_message is _MISSING else str(found_message)
        message = message or (detail if isinstance(detail, str) and detail else None)
        message = credentials.redact(message or "the upstream reported a failure")[:_MESSAGE_LIMIT]
        log.info("tool %s: answer matched failure rule %s (HTTP %s)", tool_name, rule.code, response.status)
        raise UpstreamFailure(rule.code, message, status=rule.status, retryable=rule.retryable, upstreamStatus=response.status)
