"""The preambles l4proxy ships, by the name a config gives them (``preamble = "smtp"``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .imap import IMAP
from .pop3 import POP3
from .postgres import POSTGRES
from .smtp import SMTP

if TYPE_CHECKING:
    from .dialogue import Preamble

#: Every built-in preamble, keyed by its config name.
BUILTIN_PREAMBLES: dict[str, Preamble] = {
    "postgres": POSTGRES,
    "smtp": SMTP,
    "imap": IMAP,
    "pop3": POP3,
}
