"""Secret-valued settings: inline, or from an environment variable or a file.

Why: a key password or a token written into the config file ends up in
config management, backups and ``git log``; deployments keep them in the
environment or in mounted files (Kubernetes secrets, ``/run/secrets``).
Wherever a setting is typed ``Secret`` it accepts any of::

    key_password = "inline"                    # still allowed
    key_password = { env = "TLS_KEY_PASSWORD" }
    key_password = { file = "/run/secrets/tls-key-password" }  # trailing newline dropped

resolved when the config is validated (at start, by ``sluice check`` and on
every reload, so a rotated file is read again by a reload). A variable that
is not set, or a file that cannot be read or is empty, is a config error by
key path (``filters.tls.key_password: environment variable X is not set``)
that never contains the value.

The value is a ``str`` (code using the setting needs no change) of type
``SecretText``, whose ``repr`` is ``'[redacted]'``: pydantic's errors,
tracebacks' locals and ``structlog`` fields print reprs, so a secret
reaching one of them by accident shows as redacted. The admin ``/config``
redacts by name (``sluice.control.admin.redact``), whatever the type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

__all__ = ["REDACTED", "Secret", "SecretText", "resolve_secret"]

REDACTED = "[redacted]"


class SecretText(str):
    """A secret's value: the string itself everywhere it is used, redacted in its ``repr``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(REDACTED)


def resolve_secret(value: Any) -> str:
    """The secret ``value`` names: a string as it is, ``{env = NAME}`` or ``{file = PATH}``.

    ``ValueError`` messages say what was missing, never a value."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (how, where), = value.items()
        if how == "env" and isinstance(where, str) and where:
            found = os.environ.get(where)
            if found is None:
                raise ValueError(f"environment variable {where} is not set")
            if not found:
                raise ValueError(f"environment variable {where} is empty")
            return found
        if how == "file" and isinstance(where, str) and where:
            try:
                found = Path(where).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {where}: {getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
            if not found:
                raise ValueError(f"{where} is empty")
            return found
    raise ValueError('a secret is a string, { env = "NAME" } or { file = "/path" }')


Secret = Annotated[str, BeforeValidator(resolve_secret), AfterValidator(SecretText)]
