"""Environment variables in catalog files, so one file serves every environment (a rehearsal chain,
a testnet, mainnet): a string value may hold ``${NAME}`` or ``${NAME:-default}``.

- ``${NAME}``: the variable's value; unset: ``undefined_variable`` at the value's file:line.
- ``${NAME:-default}``: the value, or ``default`` when the variable is unset or empty (as in a
  shell); the default is literal text up to the first ``}`` (``${PRICE:-$0.01}`` is fine), and
  holds no ``${``.
- ``$$``: a literal ``$``. Only ``${`` starts a variable, so a dollar price (``"$0.01"``) and any
  other lone ``$`` stay as written; a ``${`` that is not one of the forms above is
  ``invalid_interpolation``.

Only string values are read (never keys, never numbers), and what they become is still a string:
the loader validates it as if written in the file, with the same file:line diagnostics (an issue
about a value that came from the environment names the variable). Interpolation errors name the
variable, never a value. The environment is a mapping the caller passes in: this package reads no
``os.environ`` of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["VARIABLE_FORMS", "interpolate", "needs_interpolation", "variables_note"]

VARIABLE_FORMS = "${NAME} or ${NAME:-default} (NAME: letters, digits and _, not starting with a digit), or $$ for a literal $"

_SPECIAL = re.compile(r"\$[${]")
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Report = Callable[[str, str, str], None]  # (field path, code, message)


def needs_interpolation(text: str) -> bool:
    """Whether a file's text could hold a variable or ``$$`` at all (most catalogs do not)."""
    return "${" in text or "$$" in text


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else str(part)


def _expand(value: str, env: Mapping[str, str], path: str, report: Report, used: list[str]) -> str | None:
    """The string with its variables replaced, or None after reporting why it cannot be."""
    out: list[str] = []
    at = 0
    for found in _SPECIAL.finditer(value):
        start = found.start()
        if start < at:  # inside a variable already read
            continue
        out.append(value[at:start])
        if found.group() == "$$":
            out.append("$")
            at = start + 2
            continue
        match = _VARIABLE.match(value, start + 1)
        if match is None or (match.group(2) is not None and "${" in match.group(2)):
            report(path, "invalid_interpolation", f"a \"${{\" that is not a variable: write {VARIABLE_FORMS}")
            return None
        name, default = match.group(1), match.group(2)
        used.append(name)
        current = env.get(name)
        if default is not None and not current:
            out.append(default)
        elif current is None:
            report(path, "undefined_variable",
                   f"${{{name}}} is not set in the environment: set {name}, or give a default: ${{{name}:-...}}")
            return None
        else:
            out.append(current)
        at = match.end()
    out.append(value[at:])
    return "".join(out)


def interpolate(data: Any, env: Mapping[str, str], report: Report) -> tuple[Any, dict[str, tuple[str, ...]]]:
    """``data`` with every string value's variables replaced, and for each value that had any,
    its field path → the variables it read. Problems go to ``report``, each at its field path."""
    sources: dict[str, tuple[str, ...]] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            if "$" not in node or _SPECIAL.search(node) is None:
                return node
            used: list[str] = []
            expanded = _expand(node, env, path, report, used)
            if used:
                sources[path] = tuple(dict.fromkeys(used))
            return node if expanded is None else expanded
        if isinstance(node, dict):
            return {key: walk(value, _join(path, str(key))) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item, _join(path, index)) for index, item in enumerate(node)]
        return node

    return walk(data, ""), sources


def variables_note(path: str, sources: Mapping[str, tuple[str, ...]]) -> str:
    """`` (from ${A})``: the variables read by the value at ``path``; for a value written as it
    is, those its siblings read (an issue about ``payment.asset`` may be caused by ``network:
    ${X402GW_NETWORK}``); or ``""``."""
    if not path:
        return ""
    if path in sources:
        return f" (from {', '.join('${' + name + '}' for name in sources[path])})"
    cut = max(path.rfind("."), path.rfind("["))
    parent = path[:cut] if cut > 0 else ""
    names: dict[str, None] = {}
    for where, used in sources.items():
        if where == path or (parent and where.startswith((parent + ".", parent + "["))) or (not parent and "." not in where):
            names.update(dict.fromkeys(used))
    return f" (from {', '.join('${' + name + '}' for name in names)})" if names else ""
