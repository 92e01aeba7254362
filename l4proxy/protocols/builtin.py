"""TEMPORARY while the protocol modules are being written (restored from /tmp/builtin.py.final)."""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN_PREAMBLES: dict[str, Any] = {}
for _module, _name in (("postgres", "POSTGRES"), ("smtp", "SMTP"), ("imap", "IMAP"), ("pop3", "POP3")):
    try:
        BUILTIN_PREAMBLES[_module] = getattr(
            importlib.import_module(f"l4proxy.protocols.{_module}"), _name
        )
    except (ImportError, AttributeError):
        pass
