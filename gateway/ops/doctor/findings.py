"""What the doctor reports: findings (a check, its status, a stable code, a one-line message and
the fix), the report over them, its exit status and its two renderings (text and JSON).

Exit status, for scripts: 0 every check passed, 1 at least one failure, 2 warnings only (nothing
fails, something deserves a look: low gas, no admin token on a local chain, a memory store).

Nothing here holds a secret: messages name networks, addresses, URLs without their credentials
(``redact_url``) and counts, never a key, a token, a header value or a database password.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "EXIT_FAILURES",
    "EXIT_OK",
    "EXIT_WARNINGS",
    "Finding",
    "Report",
    "Status",
    "fail",
    "ok",
    "redact_url",
    "warn",
]

Status = Literal["ok", "warn", "fail"]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_WARNINGS = 2


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict. ``check`` is the kind (``rpc``, ``asset``, ``gas``, ``facilitator``,
    ``database``, ``store``, ``admin_token``, ``keys``), ``subject`` what it looked at (a network,
    ``network asset``, a facilitator URL); ``code`` is stable (``ok`` when it passed)."""

    check: str
    subject: str
    status: Status
    code: str
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        data = asdict(self)
        if not self.fix:
            del data["fix"]
        return data


def ok(check: str, subject: str, message: str) -> Finding:
    return Finding(check, subject, "ok", "ok", message)


def warn(check: str, subject: str, code: str, message: str, fix: str) -> Finding:
    return Finding(check, subject, "warn", code, message, fix)


def fail(check: str, subject: str, code: str, message: str, fix: str) -> Finding:
    return Finding(check, subject, "fail", code, message, fix)


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...]

    @classmethod
    def of(cls, findings: Iterable[Finding]) -> Report:
        order = {"fail": 0, "warn": 1, "ok": 2}
        return cls(tuple(sorted(findings, key=lambda f: (order[f.status], f.check, f.subject))))

    def count(self, status: Status) -> int:
        return sum(1 for f in self.findings if f.status == status)

    @property
    def status(self) -> Status:
        if self.count("fail"):
            return "fail"
        return "warn" if self.count("warn") else "ok"

    @property
    def exit_status(self) -> int:
        return {"ok": EXIT_OK, "fail": EXIT_FAILURES, "warn": EXIT_WARNINGS}[self.status]

    def codes(self) -> list[str]:
        """The codes of the findings that did not pass, in report order."""
        return [f.code for f in self.findings if f.status != "ok"]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exitStatus": self.exit_status,
            "counts": {s: self.count(s) for s in ("ok", "warn", "fail")},
            "findings": [f.to_json() for f in self.findings],
        }

    def render_json(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def render_text(self) -> str:
        fails, warns = self.count("fail"), self.count("warn")
        head = {"ok": "all checks passed", "warn": f"{warns} warning(s)", "fail": f"{fails} failure(s), {warns} warning(s)"}
        lines = [f"x402gw doctor: {head[self.status]} ({len(self.findings)} checks)"]
        label = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for f in self.findings:
            code = "" if f.status == "ok" else f" [{f.code}]"
            lines.append(f"{label[f.status]}  {f.check} {f.subject}{code}: {f.message}")
            if f.fix:
                lines.append(f"      fix: {f.fix}")
        return "\n".join(lines)


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """A URL fit for a report: no user, password, query or fragment (API keys hide there); without
    ``keep_path`` only scheme, host and port (RPC providers put the API key in the path)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path if keep_path else "", "", ""))
