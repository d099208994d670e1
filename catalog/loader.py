"""Read catalog YAML files into resolved, validated ``Catalog`` objects.

One pass composes the YAML node tree (for line numbers) and constructs the data from it;
YAML floats become ``Decimal`` of their source text so ``price: 0.002`` stays exact. Every
problem found becomes a ``CatalogIssue``; a load either returns a catalog or raises one
``CatalogError`` listing them all.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from catalog.bridge import bridge_problems
from catalog.errors import CatalogError, CatalogIssue
from catalog.models import (
    KNOWN_KEYS,
    Catalog,
    Catalogs,
    PaymentTerms,
    Tool,
    Upstream,
    _CatalogDoc,
    _consistency_problems,
    _ToolDoc,
)
from catalog.routing import route_shape

__all__ = ["load_catalog", "load_catalogs", "parse_catalog", "price_ceiling_issues"]

_MAX_NODES = 200_000  # a guard against alias bombs when walking the node tree


# libyaml's parser when the platform has it (tens of times faster on large catalogs).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader whose floats are ``Decimal`` of the source text: money never passes a float."""

    def construct_yaml_float(self, node: yaml.Node) -> Decimal:  # type: ignore[override]
        text = str(self.construct_scalar(node)).replace("_", "").lower()  # type: ignore[arg-type]
        special = {".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity", ".nan": "NaN"}
        if text in special:
            return Decimal(special[text])
        try:
            return Decimal(text)
        except InvalidOperation:  # sexagesimal (1:30.5) and other YAML 1.1 oddities
            return Decimal(repr(super().construct_yaml_float(node)))


_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else str(part)


class _Source:
    """One file's text, data and field-path → line map."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: dict[str, int] = {"": 1}
        self.issues: list[CatalogIssue] = []

    def issue(self, path: str, code: str, message: str, line: int | None = None) -> None:
        self.issues.append(CatalogIssue(self.name, path, line if line is not None else self.line(path), message, code))

    def line(self, path: str) -> int | None:
        # The nearest known ancestor: a missing key is reported at its parent's line.
        while path not in self.lines:
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                return self.lines[""]
            path = path[:cut]
        return self.lines[path]

    def parse(self, text: str) -> Any:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            self._walk(node, "", set(), [0])
            return loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = ", ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
            self.issue("", "yaml_syntax", f"YAML syntax error: {message}", mark.line + 1 if mark else None)
        except yaml.YAMLError as exc:
            self.issue("", "yaml_syntax", f"YAML syntax error: {exc}")
        finally:
            loader.dispose()
        return None

    def _walk(self, node: yaml.Node, path: str, stack: set[int], count: list[int]) -> None:
        count[0] += 1
        if id(node) in stack or count[0] > _MAX_NODES:
            return
        stack.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = _join(path, key_node.value)
                if key_node.value in seen:
                    self.issue(child, "duplicate_key", f"key {key_node.value!r} appears twice", key_node.start_mark.line + 1)
                seen.add(key_node.value)
                self.lines.setdefault(child, key_node.start_mark.line + 1)
                self._walk(value_node, child, stack, count)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = _join(path, index)
                self.lines.setdefault(child, item.start_mark.line + 1)
                self._walk(item, child, stack, count)
        stack.discard(id(node))

    def add_validation_errors(self, exc: ValidationError, prefix: str = "") -> None:
        for error in exc.errors(include_url=False):
            path = prefix
            for part in error["loc"]:
                if part != "[key]":
                    path = _join(path, part)
            last = str(error["loc"][-1]) if error["loc"] else ""
            kind = error["type"]
            if kind == "extra_forbidden":
                code, message = "unknown_key", f"unknown key {last!r}"
                close = difflib.get_close_matches(last, KNOWN_KEYS, n=1)
                if close:
                    message += f" (did you mean {close[0]!r}?)"
            elif kind == "missing":
                code, message = "missing_key", f"required key {last!r} is missing"
            elif kind in ("model_type", "model_attributes_type", "dict_type"):
                code, message = "invalid_value", f"expected a mapping, got {type(error['input']).__name__}"
            elif "detail" in (error.get("ctx") or {}):  # raised by our validators with a stable code
                code, message = kind, str(error["ctx"]["detail"])
            else:
                code, message = "invalid_value", error["msg"]
            self.issue(path, code, message)


def _resolve(doc: _CatalogDoc, src: _Source) -> Catalog | None:
    upstreams = {name: Upstream(name=name, **u.model_dump()) for name, u in doc.upstreams.items()}
    tools: list[Tool] = []
    names: dict[str, int] = {}
    routes: dict[tuple[str, tuple[str | None, ...]], int] = {}
    for index, spec in enumerate(doc.tools):
        at = f"tools[{index}]"
        before = len(src.issues)
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

        upstream = _pick_upstream(spec, upstreams, at, src)
        overrides = spec.payment.model_dump(exclude_none=True) if spec.payment else {}
        payment = PaymentTerms(**{**doc.payment.model_dump(), **overrides})
        upstream_path = spec.upstream_path or spec.path
        for field, code, message in _consistency_problems(
            path=spec.path, upstream_path=upstream_path, price=spec.price,
            decimals=payment.decimals, input_schema=spec.input_schema,
        ):
            src.issue(f"{at}.{field}", code, message)
        for field, code, message in bridge_problems(
            kind=spec.kind, method=spec.method,
            input_schema=spec.input_schema, request=spec.request, soap=spec.soap,
        ):
            src.issue(f"{at}.{field}", code, message)
        ceilings = [(m, w) for m, w in ((spec.max_price, f"{at}.max_price"), (doc.max_price, "max_price")) if m is not None]
        for ceiling, where in ceilings:
            if spec.price > ceiling:
                src.issue(f"{at}.price", "price_above_max", f"price {spec.price:f} is above {where} {ceiling:f}")
        if len(src.issues) > before or upstream is None:
            continue
        try:
            tools.append(Tool(
                owner=doc.owner, name=spec.name, description=spec.description, method=spec.method,
                path=spec.path, upstream=upstream, upstream_path=upstream_path, price=spec.price,
                settle=spec.settle, payment=payment, input_schema=spec.input_schema,
                output_schema=spec.output_schema, max_price=spec.max_price, budgets=spec.budgets,
                rate_limits=spec.rate_limits,
                kind=spec.kind, request=spec.request, soap=spec.soap.anchored(src.name) if spec.soap else None,
                retry=spec.retry, failure_when=spec.failure_when,
            ))
        except ValidationError as exc:  # a check the loader missed; still reported, not raised
            src.add_validation_errors(exc, at)
    if src.issues:
        return None
    return Catalog(
        source=src.name, owner=doc.owner, description=doc.description,
        payment=doc.payment, upstreams=upstreams, tools=tuple(tools),
        max_price=doc.max_price, budgets=doc.budgets, rate_limits=doc.rate_limits,
    )


def _pick_upstream(spec: _ToolDoc, upstreams: dict[str, Upstream], at: str, src: _Source) -> Upstream | None:
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


def _parse(text: str, source_name: str) -> tuple[Catalog | None, _Source]:
    src = _Source(source_name)
    data = src.parse(text)
    if src.issues:
        return None, src
    if data is None:
        src.issue("", "empty_catalog", "the file is empty")
        return None, src
    try:
        doc = _CatalogDoc.model_validate(data)
    except ValidationError as exc:
        src.add_validation_errors(exc)
        return None, src
    return _resolve(doc, src), src


def _read(path: str | os.PathLike[str]) -> tuple[Catalog | None, _Source]:
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        src = _Source(name)
        src.issue("", "file_not_found", "no such file")
        return None, src
    except (OSError, UnicodeDecodeError) as exc:
        src = _Source(name)
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or type(exc).__name__)
        src.issue("", "file_unreadable", f"cannot read the file: {reason}", line=None)
        return None, src
    return _parse(text, name)


def _fixed_lines(src: _Source) -> list[CatalogIssue]:
    return sorted(src.issues, key=lambda i: (i.line or 0))


def parse_catalog(text: str, source_name: str = "<catalog>") -> Catalog:
    catalog, src = _parse(text, source_name)
    if catalog is None:
        raise CatalogError(_fixed_lines(src))
    return catalog


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    catalog, src = _read(path)
    if catalog is None:
        raise CatalogError(_fixed_lines(src))
    return catalog


def load_catalogs(paths: Iterable[str | os.PathLike[str]]) -> Catalogs:
    """Load several owners' files; every file is checked, and all issues are raised together."""
    issues: list[CatalogIssue] = []
    loaded: list[Catalog] = []
    names: dict[str, str] = {}
    routes: dict[tuple[str, tuple[str | None, ...]], tuple[str, str]] = {}
    for path in paths:
        catalog, src = _read(path)
        if catalog is None:
            issues.extend(_fixed_lines(src))
            continue
        for index, tool in enumerate(catalog.tools):
            at = f"tools[{index}]"
            if tool.name in names:
                src.issue(f"{at}.name", "duplicate_tool", f"tool name {tool.name!r} is already used in {names[tool.name]}")
            names.setdefault(tool.name, catalog.source)
            shape = route_shape(tool.method, tool.path)
            if shape in routes:
                source, other = routes[shape]
                src.issue(f"{at}.path", "duplicate_route",
                          f"route {tool.method} {tool.path} collides with tool {other!r} in {source}")
            routes.setdefault(shape, (catalog.source, tool.name))
        issues.extend(_fixed_lines(src))
        loaded.append(catalog)
    if issues:
        raise CatalogError(issues)
    if not loaded:
        raise CatalogError([CatalogIssue("<catalogs>", "", None, "no catalog files given", "no_catalogs")])
    return Catalogs(catalogs=tuple(loaded))


def price_ceiling_issues(catalogs: Catalogs, ceiling: Decimal, setting: str = "X402GW_MAX_PRICE") -> list[CatalogIssue]:
    """Tools priced above a gateway-wide ceiling, as issues pointing at the price's line."""
    issues: list[CatalogIssue] = []
    for catalog in catalogs.catalogs:
        src: _Source | None = None
        for index, tool in enumerate(catalog.tools):
            if tool.price <= ceiling:
                continue
            if src is None:
                src = _Source(catalog.source)
                try:
                    src.parse(Path(catalog.source).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    pass  # no line numbers: the issue still names the tool
            at = f"tools[{index}].price"
            issues.append(CatalogIssue(
                catalog.source, at, src.line(at), f"price {tool.price:f} of {tool.name} is above {setting} {ceiling:f}",
                "price_above_max",
            ))
    return issues
