"""The key table: what each config key accepts, read from the attrs fields themselves.

Every key of the configuration is an attrs field of a config class (in
:mod:`l4proxy.config` and :mod:`l4proxy.listenerconfig`) whose metadata holds a
:class:`Key` naming its kind (:mod:`l4proxy.configkinds`)::

    idle_timeout: float = attrs.field(
        default=0.0, metadata=key(Seconds(), flag="--idle-timeout", inherit=True)
    )

From that one declaration:

* :class:`MappingReader` reads the key from the TOML shape, collecting every problem
  with its key path (``listeners[1].idle_timeout: expected a number of seconds >= 0,
  got -1``) instead of stopping at the first;
* :func:`check_kinds` (the classes' ``field_transformer``) validates the value when
  the class is built in code, with the same message;
* ``inherit=True`` makes a listener key a top-level default for every listener;
* ``flag`` names its command-line flag: the command turns the flag into the key and a
  key path in an error back into the flag (:func:`flag_along`).

This module knows no config class or kind by name (the classes name their nested
tables in their keys), so the config modules import it without a cycle.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TypeVar

import attrs

from .errors import ConfigError

__all__ = [
    "Key",
    "Kind",
    "MappingReader",
    "check_kinds",
    "flag_along",
    "key",
    "keys_of",
    "kind_name",
    "read_toml",
]

T = TypeVar("T", bound=attrs.AttrsInstance)

#: Where a field keeps its :class:`Key` in ``attrs.Attribute.metadata``.
METADATA = "l4proxy.key"


class Kind:
    """What a key accepts. Subclasses read a TOML value (:meth:`read`) and may check a
    value given in code (:meth:`check`); both report problems as message text without
    the key path, which the caller adds."""

    #: What the key takes, for ``required (...)`` messages: ``a list of addresses``.
    expects: str = "a value"

    @property
    def missing(self) -> str:
        """The problem when a required key is absent."""
        return f"required ({self.expects})"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        """The value to build the class with; problems go to ``reader.problem``.
        By default: :meth:`check`, then :meth:`convert`."""
        problem = self.check(value)
        if problem:
            reader.problem(path, problem)
            return None
        return self.convert(reader, value)

    def check(self, value: object) -> str | None:
        """Why ``value`` (from the file, or passed to the class in code) is unusable,
        or ``None``."""
        return None

    def convert(self, reader: MappingReader, value: object) -> object:
        """A file's value that passed :meth:`check`, as the class takes it."""
        return value

    @property
    def table(self) -> type[attrs.AttrsInstance] | None:
        """The class of a nested table (for flag lookups), if the key holds one."""
        return None


@attrs.frozen
class Key:
    """A config key: how to read and check it, and where else it can be given.

    Attributes:
        kind: what it accepts (:class:`~l4proxy.configkinds.Seconds`, ...).
        flag: its command-line flag, if it has one.
        inherit: a listener key that may also be set at the top level, as the default
            for every listener.
        required: it must be given (unless the key named by ``unless`` is there).
        unless: with ``required``: another key whose presence makes this one optional.
    """

    kind: Kind
    flag: str | None = None
    inherit: bool = False
    required: bool = False
    unless: str | None = None


def key(
    kind: Kind,
    *,
    flag: str | None = None,
    inherit: bool = False,
    required: bool = False,
    unless: str | None = None,
) -> dict[str, Key]:
    """Field metadata declaring a config key: ``attrs.field(metadata=key(Seconds()))``."""
    return {METADATA: Key(kind, flag=flag, inherit=inherit, required=required, unless=unless)}


def keys_of(cls: type[attrs.AttrsInstance]) -> dict[str, Key]:
    """The keys of a config class, in field order."""
    return {
        field.name: field.metadata[METADATA]
        for field in attrs.fields(cls)
        if METADATA in field.metadata
    }


def check_kinds(_cls: type, fields: list[attrs.Attribute[object]]) -> list[attrs.Attribute[object]]:
    """``field_transformer`` of the config classes: each key is validated by its kind
    also when the class is built in code (``ListenerConfig(idle_timeout=-1)``)."""
    result = []
    for field in fields:
        spec = field.metadata.get(METADATA)
        if isinstance(spec, Key) and type(spec.kind).check is not Kind.check:
            check = _validator(spec.kind)
            if field.default is None:  # unset optional keys are not checked
                check = attrs.validators.optional(check)
            validator = (
                check if field.validator is None else attrs.validators.and_(field.validator, check)
            )
            field = field.evolve(validator=validator)
        result.append(field)
    return result


def _validator(kind: Kind) -> Callable[[object, attrs.Attribute[object], object], None]:
    def validate(_instance: object, attribute: attrs.Attribute[object], value: object) -> None:
        problem = kind.check(value)
        if problem:
            raise ConfigError(f"{attribute.name}: {problem}")

    return validate


def flag_along(cls: type[attrs.AttrsInstance], names: list[str]) -> str | None:
    """The flag of the deepest key along ``names`` (a key path without indexes, from
    ``cls``) that has one: ``["tls", "certs", "key"]`` from the listener is ``--tls-key``,
    ``["routes", "sni"]`` is ``--route``."""
    flag = None
    table: type[attrs.AttrsInstance] | None = cls
    for name in names:
        spec = keys_of(table).get(name) if table is not None else None
        if spec is None:
            break
        flag = spec.flag or flag
        table = spec.kind.table
    return flag


class MappingReader:
    """Reads the TOML shape into config classes, appending problems instead of raising.

    Args:
        base_dir: the directory file paths are relative to (a config file's own).
    """

    def __init__(self, base_dir: str | Path | None = None) -> None:
        self.problems: list[str] = []
        self.base_dir = Path(base_dir) if base_dir is not None else None

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def resolve(self, file: str) -> str:
        """A file path relative to ``base_dir``; absolute paths and ``-`` stay."""
        if self.base_dir is not None and file != "-":
            return str(self.base_dir / file)
        return file

    def table(
        self,
        cls: type[T],
        data: object,
        path: str,
        inherited: Mapping[str, object] | None = None,
    ) -> T | None:
        """``cls`` built from the table ``data`` (on top of ``inherited`` values), or
        ``None`` after reporting its problems, including those of ``cls`` itself."""
        if not isinstance(data, Mapping):
            self.problem(path, f"expected a table, got {kind_name(data)}")
            return None
        before = len(self.problems)
        keys = keys_of(cls)
        self.reject_unknown(data, keys, path)
        kwargs = {**(inherited or {}), **self.values(keys, data, path)}
        if len(self.problems) > before:
            return None
        try:
            return cls(**kwargs)
        except ConfigError as exc:  # the class's own (cross-key) rules
            self.problems.extend(f"{path}.{problem}" for problem in exc.problems)
            return None

    def values(
        self, keys: Mapping[str, Key], data: Mapping[str, object], path: str
    ) -> dict[str, object]:
        """The values of ``keys`` present in ``data``, read by their kinds; reports the
        required ones that are missing. A ``None`` value counts as missing."""
        values = {}
        for name, spec in keys.items():
            where = f"{path}.{name}" if path else name
            value = data.get(name)
            if value is None:
                if spec.required and not (spec.unless and spec.unless in data):
                    self.problem(where, spec.kind.missing)
                continue
            before = len(self.problems)
            value = spec.kind.read(self, value, where)
            if len(self.problems) == before:
                values[name] = value
        return values

    def reject_unknown(
        self, data: Mapping[str, object], allowed: Collection[str], path: str
    ) -> None:
        for name in data:
            if name in allowed:
                continue
            close = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem(f"{path}.{name}" if path else name, f"unknown key{hint}")


def read_toml(path: str | Path) -> dict[str, object]:
    """Read a TOML file into a mapping, or raise ``ConfigError`` naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", source=str(path)
        ) from exc
    try:
        # TOML files are UTF-8 (TOML 1.0, "Spec"); tomllib would let the decode error out.
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"invalid TOML: not UTF-8 ({exc.reason} at line {line})", source=str(path)
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from exc


def kind_name(value: object) -> str:
    """A TOML-ish name for a value's type, for error messages."""
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
