"""Server names against exact and one-label wildcard patterns (sans-IO).

The one implementation of the name rules that routes (:mod:`l4proxy.routing`) and
certificates (:class:`l4proxy.tls.ServerTLS`) share:

* **Normal form.** Names and patterns compare in lower case without one trailing dot
  (DNS names are case-insensitive, RFC 4343; ``example.com.`` is the same host).
  :func:`normalize` is the only place that says so.
* **Exact before wildcard.** Values added for the name itself come first; then values
  added for ``*.`` plus the name's parent domain (nginx's precedence, and RFC 6125
  §6.4.3's one-label wildcard). ``*.example.com`` stands for ``db.example.com``, not
  for ``a.b.example.com``, nor ``example.com``, nor ``.example.com`` (an empty label
  is no label).
* **Insertion order within each group.** The caller decides among several values for
  one name (routes by ALPN, certificates first-listed-wins).

Nothing here validates patterns: the config does (``config.server_name_problem``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Sequence

T = TypeVar("T")

_WILDCARD = "*."
_NONE: tuple[()] = ()


def normalize(name: str) -> str:
    """A name or pattern in the form tables compare: lower case, no trailing dot.

    Example:
        >>> normalize("DB.Example.COM.")
        'db.example.com'
    """
    return name.lower().removesuffix(".")


class NameTable(Generic[T]):
    """Values filed under host names and ``*.`` patterns; built once, then only read.

    Example:
        >>> table = NameTable[str]()
        >>> table.add("*.example.com", "any")
        >>> table.add("db.example.com", "db")
        >>> table.lookup("DB.example.com."), table.lookup("www.example.com")
        ((['db'], ['any']), ((), ['any']))
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[T]] = {}
        self._wildcard: dict[str, list[T]] = {}  # by the domain after "*."

    def add(self, pattern: str, value: T) -> None:
        """File ``value`` under ``pattern``: a host name, or ``*.`` and a domain."""
        pattern = normalize(pattern)
        if pattern.startswith(_WILDCARD):
            self._wildcard.setdefault(pattern[len(_WILDCARD) :], []).append(value)
        else:
            self._exact.setdefault(pattern, []).append(value)

    def lookup(self, server_name: str) -> tuple[Sequence[T], Sequence[T]]:
        """The values for ``server_name``: ``(exact, wildcard)``, each in the order added.

        Exact ones take precedence: callers try the first group, then the second.
        (A pair of groups, not a generator: this runs once per connection, and the
        generator cost 100-200 ns more per lookup.) The sequences are the table's
        own; do not change them.
        """
        name = normalize(server_name)
        label, dot, parent = name.partition(".")
        return (
            self._exact.get(name, _NONE),
            self._wildcard.get(parent, _NONE) if label and dot else _NONE,
        )
