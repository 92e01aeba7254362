"""Which live connection owns a session key (sans-IO): PostgreSQL's cancel routing.

A PostgreSQL client cancels a query by opening a *new* connection that carries only
the session's key (BackendKeyData: process id and secret). A cleartext cancel has no
SNI, so with SNI routing to several clusters the proxy must remember where each session
went: the PostgreSQL preamble announces the key it saw in the backend's first messages
(:class:`~l4proxy.protocols.dialogue.SessionKey`), and the cancel connection asks for
the owner (:class:`~l4proxy.protocols.dialogue.ConnectSessionOwner`).

The table is bounded: an entry lives while its connection does (removed when the
connection is logged), and past :data:`DEFAULT_CAPACITY` the oldest entry makes room.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["DEFAULT_CAPACITY", "SessionTable"]

T = TypeVar("T")

#: Live sessions remembered per proxy; each entry is a key of at most 260 bytes and a
#: reference, so the cap holds the table to a few tens of MiB at most.
DEFAULT_CAPACITY = 100_000


class SessionTable(Generic[T]):
    """Session key → owner, for live owners only.

    Example:
        >>> table = SessionTable[str](capacity=2)
        >>> table.register(b"k1", "a"); table.register(b"k2", "b"); table.register(b"k3", "c")
        >>> table.owner(b"k1") is None, table.owner(b"k3")
        (True, 'c')
        >>> table.discard(b"k3", "someone else"); table.owner(b"k3")
        'c'
    """

    __slots__ = ("_owners", "capacity")

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._owners: dict[bytes, T] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def register(self, key: bytes, owner: T) -> None:
        """``owner`` holds ``key`` from now on (a key seen again moves to its new owner)."""
        owners = self._owners
        owners.pop(key, None)
        if len(owners) >= self.capacity:
            del owners[next(iter(owners))]  # the oldest: dicts keep insertion order
        owners[key] = owner

    def owner(self, key: bytes) -> T | None:
        return self._owners.get(key)

    def discard(self, key: bytes, owner: T) -> None:
        """Forget ``key`` if ``owner`` still holds it (not if it moved on since)."""
        if self._owners.get(key) is owner:
            del self._owners[key]
