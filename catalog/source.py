"""One catalog file as read: its YAML text, its data, its field-path → line map and its issues.

The data is built straight from libyaml's events; the YAML node tree, which knows each field's
line, is composed only when there is something to report (or when the text uses what the fast
path leaves to PyYAML: tags, merge keys, a key written twice...), so a clean 10,000-tool catalog
loads in a fraction of a second. YAML floats become ``Decimal`` of their source text so
``price: 0.002`` stays exact. Every problem found becomes a ``CatalogIssue`` naming its line.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from pydantic import ValidationError

from catalog.documents import KNOWN_KEYS
from catalog.errors import CatalogIssue

__all__ = ["MAX_FILE_BYTES", "Source", "read_catalog_text"]

_MAX_NODES = 200_000  # a guard against alias bombs: aliased nodes walked again for the line map
# A YAML number beyond these is refused where it is written (invalid_number): 1e-999999999 would
# make every later ``f"{price:f}"`` or ``int()`` build a billion-digit string.
_MAX_EXPONENT, _MAX_DIGITS = 400, 400


# libyaml's parser when the platform has it (tens of times faster on large catalogs).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# The numbers a catalog writes as numbers: decimal, as YAML 1.2 and every reader expects. YAML 1.1's
# other forms (sexagesimal 1:30.5 = 90.5, leading-zero octal, 0x, 0b, underscores) are read as text,
# so a price written "1:30" is refused as no price rather than taken as 90.
_DECIMAL_NUMBER = re.compile(r"[-+]?(?:[0-9]+|[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader whose floats are ``Decimal`` of the source text: money never passes a float."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._plain_tags: dict[str, str] = {}

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        # The composer asks the tag of every node, and matching a plain scalar against the implicit
        # resolvers' regexes is most of the parse; a catalog repeats the same plain scalars.
        if kind is yaml.ScalarNode and implicit[0]:
            tag = self._plain_tags.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if tag in (_INT, _FLOAT) and not _DECIMAL_NUMBER.fullmatch(value):
                    tag = _STR  # YAML 1.1's 1:30 (90), 017 (octal 15), 0x1F, 0b101, 1_000: text, for the field to judge
                self._plain_tags[value] = tag
            return tag
        resolved: str = super().resolve(kind, value, implicit)
        return resolved

    def construct_yaml_float(self, node: yaml.Node) -> Decimal:
        text = str(self.construct_scalar(node)).replace("_", "").lower()
        special = {".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity", ".nan": "NaN"}
        if text in special:
            return Decimal(special[text])
        try:
            value = Decimal(text)
        except InvalidOperation:  # sexagesimal (1:30.5) and other YAML 1.1 oddities
            return Decimal(repr(super().construct_yaml_float(node)))
        if len(value.as_tuple().digits) > _MAX_DIGITS or abs(value.adjusted()) > _MAX_EXPONENT:
            raise _NumberOutOfRange(None, None, "a number with too many digits or too large an exponent",
                                    node.start_mark)
        return value

    def construct_yaml_int(self, node: yaml.Node) -> int:
        try:
            text = str(self.construct_scalar(node))
            if _DECIMAL_NUMBER.fullmatch(text):
                return int(text, 10)  # 017 is seventeen (YAML 1.2), never octal fifteen
            return int(super().construct_yaml_int(node))
        except ValueError:  # more digits than Python converts (4300)
            raise _NumberOutOfRange(None, None, "an integer with too many digits", node.start_mark) from None


class _NumberOutOfRange(yaml.constructor.ConstructorError):
    """A YAML number too long or too large to be a catalog value: ``invalid_number``, at its line."""


_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

_STR, _NULL, _BOOL, _INT, _FLOAT, _MAP, _SEQ = (
    f"tag:yaml.org,2002:{name}" for name in ("str", "null", "bool", "int", "float", "map", "seq")
)


class _NeedsFullConstructor(Exception):
    """The text uses what ``_construct_plain`` leaves to PyYAML's composer and constructor: explicit
    tags, merge keys, recursive aliases, a key written twice, a syntax error. The full path (node
    tree, line map, ``construct_document``) handles it, and reports what is to be reported."""


_NO_KEY = object()  # a mapping's next event is a key


def _construct_plain(text: str) -> Any:
    """The data of a document of plain maps, sequences and scalars, built from the parser's events:
    what composing the node tree and ``construct_document`` give, in half the time (no node tree,
    no resolver calls per node). Anything else raises ``_NeedsFullConstructor``."""
    loader = _Loader(text)
    try:
        return _build_from_events(loader)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise _NeedsFullConstructor(type(exc).__name__) from None
    finally:
        loader.dispose()


def _build_from_events(loader: _Loader) -> Any:
    """Longer than the ~60-line rule on purpose: one loop over every YAML event of a catalog (millions
    for a large one), with the scalar, collection and alias cases inline; a call per event would cost
    a measurable share of the load time."""
    get, bools, plain_tags = loader.get_event, loader.bool_values, loader._plain_tags
    scalar_event, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    mapping_end, sequence_end, alias_event = yaml.MappingEndEvent, yaml.SequenceEndEvent, yaml.AliasEvent
    anchors: dict[str, Any] = {}
    get()  # stream start
    if type(get()) is yaml.StreamEndEvent:
        return None  # no document
    # The open collections, innermost last: (collection, its pending key, keys seen, anchor).
    stack: list[tuple[Any, Any, set[str] | None, str | None]] = []
    collection: Any = None
    key: Any = _NO_KEY
    seen: set[str] | None = None  # the raw keys of the innermost mapping (None: a sequence)
    anchor: str | None = None
    root: Any = None
    while True:
        event = get()
        kind = type(event)
        value: Any
        if kind is scalar_event:
            text, tag = event.value, event.tag
            if tag is None or tag == "!":
                if event.implicit[0]:
                    tag = plain_tags.get(text) or loader.resolve(yaml.ScalarNode, text, event.implicit)
                else:
                    tag = _STR
            if tag == _STR:
                value = text
            elif tag == _NULL:
                value = None
            elif tag == _BOOL:
                value = bools[text.lower()]
            elif tag == _INT:
                value = loader.construct_yaml_int(yaml.ScalarNode(tag, text))
            elif tag == _FLOAT:
                value = loader.construct_yaml_float(yaml.ScalarNode(tag, text))
            else:
                raise _NeedsFullConstructor(tag)
            if event.anchor is not None:
                if event.anchor in anchors:
                    raise _NeedsFullConstructor("duplicate anchor")
                anchors[event.anchor] = value
        elif kind is mapping_start or kind is sequence_start:
            if event.tag is not None and event.tag != (_MAP if kind is mapping_start else _SEQ):
                raise _NeedsFullConstructor(event.tag)
            if collection is not None and seen is not None and key is _NO_KEY:
                raise _NeedsFullConstructor("complex key")
            stack.append((collection, key, seen, anchor))
            if kind is mapping_start:
                collection, seen = {}, set()
            else:
                collection, seen = [], None
            key, anchor = _NO_KEY, event.anchor
            continue
        elif kind is mapping_end or kind is sequence_end:
            value = collection
            # A repeated key is reported (duplicate_key) by the full path, which knows its line;
            # so is a pair of keys written differently that are equal (1 and 0x1).
            if seen is not None and len(value) != len(seen):
                raise _NeedsFullConstructor("repeated key")
            if anchor is not None:
                if anchor in anchors:
                    raise _NeedsFullConstructor("duplicate anchor")
                anchors[anchor] = value
            collection, key, seen, anchor = stack.pop()
        elif kind is alias_event:
            if event.anchor not in anchors:  # undefined, or an alias inside its own anchor
                raise _NeedsFullConstructor("alias")
            value = anchors[event.anchor]
        elif kind is yaml.DocumentEndEvent:
            if type(get()) is not yaml.StreamEndEvent:
                raise _NeedsFullConstructor("several documents")
            return root
        else:
            raise _NeedsFullConstructor(kind.__name__)
        if seen is None:
            if collection is None:
                root = value
            else:
                collection.append(value)
        elif key is _NO_KEY:
            if kind is not scalar_event or event.value in seen:
                raise _NeedsFullConstructor("complex or repeated key")
            seen.add(event.value)
            key = value
        else:
            collection[key] = value
            key = _NO_KEY


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else str(part)


MAX_FILE_BYTES = 64 * 1024 * 1024  # a catalog of 10,000 tools is a few MB


def read_catalog_text(name: str) -> str:
    """A catalog file's text. Only a regular file is read (a FIFO would block the start-up for ever,
    /dev/zero fill the memory), and at most ``MAX_FILE_BYTES``: else ``OSError`` saying why.
    ``FileNotFoundError`` and ``UnicodeDecodeError`` as ``Path.read_text`` raises them."""
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without a writer
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(0, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text reads it


class Source:
    """One file's text, data and field-path → line map.

    The line map costs as much as the parse itself, and is needed only when there is something to
    report: a clean document is built without it, and the map is made from the text on first use.
    """

    def __init__(self, name: str, text: str | None = None) -> None:
        self.name = name
        self.text = text
        self._lines: dict[str, int] | None = None
        self.issues: list[CatalogIssue] = []

    def issue(self, path: str, code: str, message: str, line: int | None = None) -> None:
        self.issues.append(CatalogIssue(self.name, path, line if line is not None else self.line(path), message, code))

    @property
    def lines(self) -> dict[str, int]:
        if self._lines is None:
            self._lines = {"": 1}
            if self.text is not None:
                loader = _Loader(self.text)
                try:
                    node = loader.get_single_node()
                    if node is not None:
                        self._walk(node, "", set(), set(), [0], report=False)
                except yaml.YAMLError:
                    pass  # a text that does not parse: every issue is at line 1
                finally:
                    loader.dispose()
        return self._lines

    def line(self, path: str) -> int | None:
        # The nearest known ancestor: a missing key is reported at its parent's line.
        lines = self.lines
        while path not in lines:
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                return lines[""]
            path = path[:cut]
        return lines[path]

    def parse(self, text: str) -> Any:
        self.text, self._lines = text, None
        try:
            return _construct_plain(text)
        except _NeedsFullConstructor:
            pass
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            self._lines = {"": 1}
            self._walk(node, "", set(), set(), [0], report=True)
            return loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = ", ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
            if isinstance(exc, _NumberOutOfRange):
                self.issue("", "invalid_number", f"{message} to be a catalog value", mark.line + 1 if mark else None)
            else:
                self.issue("", "yaml_syntax", f"YAML syntax error: {message}", mark.line + 1 if mark else None)
        except yaml.YAMLError as exc:
            self.issue("", "yaml_syntax", f"YAML syntax error: {exc}")
        finally:
            loader.dispose()
        return None

    def _walk(
        self, node: yaml.Node, path: str, stack: set[int], seen: set[int], revisits: list[int], *, report: bool
    ) -> None:
        # An alias is walked again under its own path (its fields get lines there too); the walk
        # is bounded by the number of such re-visits, not by the size of the file.
        if id(node) in stack:
            return
        if id(node) in seen:
            revisits[0] += 1
            if revisits[0] > _MAX_NODES:
                return
        seen.add(id(node))
        stack.add(id(node))
        lines = self._lines
        assert lines is not None
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = _join(path, key_node.value)
                if key_node.value in keys and report:
                    self.issue(child, "duplicate_key", f"key {key_node.value!r} appears twice", key_node.start_mark.line + 1)
                keys.add(key_node.value)
                lines.setdefault(child, key_node.start_mark.line + 1)
                self._walk(value_node, child, stack, seen, revisits, report=report)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = _join(path, index)
                lines.setdefault(child, item.start_mark.line + 1)
                self._walk(item, child, stack, seen, revisits, report=report)
        stack.discard(id(node))

    def add_validation_errors(self, exc: ValidationError, prefix: str = "") -> None:
        for error in exc.errors(include_url=False):
            path = prefix
            # "[key]", and the tags of a tagged union ("[rule]"), are no part of the document's path.
            loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("["))]
            for part in loc:
                path = _join(path, part)
            last = str(loc[-1]) if loc else ""
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

