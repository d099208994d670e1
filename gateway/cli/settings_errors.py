"""Settings a command cannot start with, said in one line with a stable code, never a traceback,
never a value: an environment variable may hold a key, a token or a password.

    error: invalid settings: X402GW_PORT: Input should be a valid integer [invalid_setting]
    error: X402GW_SETTLEMENT_KEY_FILE: cannot read /run/secrets/key: No such file ... [secret_file_unreadable]

Codes: ``invalid_setting`` (a value of the wrong shape: pydantic's message, its ``input`` left
out), ``invalid_setting_json`` (a JSON setting that does not parse), and the codes of the settings' own
checks (``gateway.settings``: ``secret_file_unreadable``, ``secret_file_empty``,
``secret_set_twice``; a check without a code of its own is ``invalid_setting`` too).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway.errors import GatewayConfigError
from gateway.settings import Settings

__all__ = ["describe_settings_error", "load_settings"]

_UNCODED = GatewayConfigError("").code  # the default code of GatewayConfigError

# Fields read from a variable without the X402GW_ prefix (their validation_alias).
_UNPREFIXED = {"facilitator_url": "X402_FACILITATOR_URL", "cdp_api_key_id": "CDP_API_KEY_ID",
               "cdp_api_key_secret": "CDP_API_KEY_SECRET"}


def _variable(field: object) -> str:
    name = str(field)
    if name in _UNPREFIXED.values() or name.startswith("X402GW_"):
        return name
    return _UNPREFIXED.get(name, f"X402GW_{name.upper()}")


def describe_settings_error(exc: Exception) -> tuple[str, str]:
    """(one-line message, stable code) for an error building ``Settings``; no value in it."""
    if isinstance(exc, ValidationError):
        problems = []
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            loc = error["loc"]
            where = _variable(loc[0]) + "".join(f"[{part!r}]" for part in loc[1:]) if loc else "settings"
            problems.append(f"{where}: {error['msg']}")
        return "invalid settings: " + "; ".join(problems), "invalid_setting"
    if isinstance(exc, SettingsError):  # its message names the field and the source, never the value
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "a setting"
        return f"invalid settings: {_variable(field)} is not valid JSON", "invalid_setting_json"
    if isinstance(exc, GatewayConfigError):  # raised by the settings' own checks: never quote a secret
        # a check without a code of its own (URL lists, dollar rates...): a value of the wrong shape
        return exc.message, "invalid_setting" if exc.code == _UNCODED else exc.code
    raise TypeError(type(exc).__name__)


def load_settings(overrides: dict[str, Any] | None = None, *, exit_status: int = 2) -> Settings:
    """``Settings`` from the environment (and a command's options), or one line on standard error
    and ``exit_status``."""
    try:
        return Settings(**(overrides or {}))
    except (ValidationError, SettingsError, GatewayConfigError) as exc:
        _exit(*describe_settings_error(exc), exit_status)


def _exit(message: str, code: str, status: int) -> NoReturn:
    click.echo(f"error: {' '.join(message.split())} [{code}]", err=True)
    sys.exit(status)
