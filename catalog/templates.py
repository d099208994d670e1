"""Path templates: ``/quotes/{symbol}`` split into literal and parameter segments.

Shared by the models (a tool's path and upstream path must use the same parameters) and the router;
it imports nothing of the catalog, so neither depends on the other through it.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

__all__ = ["Segment", "parse_template", "route_shape"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
# RFC 3986 pchar without '%': no encoded forms, so a template means exactly what it says.
_LITERAL = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


class Segment(NamedTuple):
    value: str  # the literal text, or the parameter name
    is_param: bool


def parse_template(path: str, *, allow_trailing_slash: bool = False) -> tuple[Segment, ...]:
    if not isinstance(path, str):
        raise ValueError(f"path {path!r} must start with '/'")
    return _parse_template(path, allow_trailing_slash)


@functools.lru_cache(maxsize=65536)
def _parse_template(path: str, allow_trailing_slash: bool) -> tuple[Segment, ...]:
    """Split ``/quotes/{symbol}`` into segments; ValueError with a readable reason if invalid."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path {path!r} must start with '/'")
    for char in "?#%":
        if char in path:
            raise ValueError(f"path {path!r} must not contain {char!r}")
    raw = path[1:].split("/")
    if allow_trailing_slash and raw[-1] == "" and len(raw) > 1:
        raw = raw[:-1]
    segments: list[Segment] = []
    names: set[str] = set()
    for text in raw:
        if text == "":
            raise ValueError(f"path {path!r} has an empty segment")
        if text in (".", ".."):
            raise ValueError(f"path {path!r} must not contain '.' or '..' segments")
        param = _PARAM.fullmatch(text)
        if param:
            name = param.group(1)
            if name in names:
                raise ValueError(f"path {path!r} uses parameter {{{name}}} twice")
            names.add(name)
            segments.append(_segment(name, True))
        elif _LITERAL.fullmatch(text):
            segments.append(_segment(text, False))
        else:
            raise ValueError(
                f"path {path!r}: segment {text!r} must be a literal or a whole {{param}} "
                "(param names: letters, digits, '_')"
            )
    return tuple(segments)


# Templates share most segments ("quotes", "{symbol}"); one object each keeps a large catalog's
# cached templates small (a NamedTuple is never untracked by the cycle collector).
_segment = functools.lru_cache(maxsize=65536)(Segment)


def route_shape(method: str, path: str) -> tuple[str, tuple[str | None, ...]]:
    """Key under which two routes collide: ``/a/{x}`` and ``/a/{y}`` have the same shape."""
    return method.upper(), tuple(None if s.is_param else s.value for s in parse_template(path))

