"""The name matcher that routes and certificates share, sans-IO (hypothesis)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, strategies as st

import l4proxy.names
from l4proxy.names import NameTable, normalize

# A few short labels, so that generated names and patterns often collide.
_label = st.one_of(
    st.sampled_from(["a", "b", "db", "x-1", "example", "com"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True),
)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_pattern = st.tuples(st.booleans(), _domain).map(lambda p: f"*.{p[1]}" if p[0] else p[1])


@st.composite
def _spelling(draw: st.DrawFn, name: str) -> str:
    """The same name in another case, maybe with a trailing dot."""
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    return cased + ("." if draw(st.booleans()) else "")


def reference(patterns: list[str], name: str) -> tuple[list[int], list[int]]:
    """What matching means, label by label (no dicts, no string slicing)."""
    labels = name.lower().removesuffix(".").split(".")
    exact: list[int] = []
    wildcard: list[int] = []
    for index, pattern in enumerate(patterns):
        wanted = pattern.lower().removesuffix(".").split(".")
        if wanted[0] != "*":
            if wanted == labels:
                exact.append(index)
        elif len(labels) == len(wanted) and labels[0] != "" and labels[1:] == wanted[1:]:
            wildcard.append(index)
    return exact, wildcard


def table_of(patterns: list[str]) -> NameTable[int]:
    table: NameTable[int] = NameTable()
    for index, pattern in enumerate(patterns):
        table.add(pattern, index)
    return table


def looked_up(table: NameTable[int], name: str) -> tuple[list[int], list[int]]:
    exact, wildcard = table.lookup(name)
    return list(exact), list(wildcard)


@st.composite
def _patterns_and_name(draw: st.DrawFn) -> tuple[list[str], str]:
    """Patterns (in any spelling) and a name that is often one of them, or one label
    more or fewer than one, or unrelated."""
    patterns = draw(st.lists(_pattern, min_size=1, max_size=6))
    base = draw(st.sampled_from(patterns)).removeprefix("*.")
    name = draw(
        st.one_of(
            st.just(base),
            _label.map(lambda label: f"{label}.{base}"),
            _label.flatmap(lambda label: _label.map(lambda other: f"{label}.{other}.{base}")),
            st.just(base.partition(".")[2] or base),
            _domain,
        )
    )
    spelled = [draw(_spelling(pattern)) for pattern in patterns]
    return spelled, draw(_spelling(name))


@given(_patterns_and_name())
def test_lookups_agree_with_the_label_by_label_reference(case: tuple[list[str], str]) -> None:
    patterns, name = case
    assert looked_up(table_of(patterns), name) == reference(patterns, name)


@given(_domain, _label, st.lists(_pattern, max_size=4))
def test_an_exact_name_always_beats_a_wildcard(domain: str, label: str, others: list[str]) -> None:
    name = f"{label}.{domain}"
    # The wildcard is added first: precedence is by kind, not by order.
    table = table_of([f"*.{domain}", name, *others])
    exact, wildcard = table.lookup(name)
    assert exact[0] == 1
    assert 0 in wildcard
    assert [*exact, *wildcard][0] == 1  # what a caller taking the first gets


@given(_domain, _label, _label)
def test_a_wildcard_stands_for_exactly_one_label(domain: str, first: str, second: str) -> None:
    table = table_of([f"*.{domain}"])
    assert looked_up(table, f"{first}.{domain}") == ([], [0])
    assert looked_up(table, f"{first}.{second}.{domain}") == ([], [])  # two labels
    assert looked_up(table, domain) == ([], [])  # none
    assert looked_up(table, f".{domain}") == ([], [])  # an empty label is no label


@given(st.data(), st.lists(_pattern, min_size=1, max_size=6))
def test_case_and_a_trailing_dot_do_not_matter(data: st.DataObject, patterns: list[str]) -> None:
    table = table_of(patterns)
    name = data.draw(st.sampled_from(patterns)).replace("*", "w")
    assert looked_up(table, data.draw(_spelling(name))) == looked_up(table, name)
    respelled = table_of([data.draw(_spelling(pattern)) for pattern in patterns])
    assert looked_up(respelled, name) == looked_up(table, name)


def test_values_keep_the_order_they_were_added_in() -> None:
    table = table_of(["db.example", "*.example", "DB.example.", "*.Example"])
    assert looked_up(table, "db.example") == ([0, 2], [1, 3])
    assert looked_up(table, "nothing.here") == ([], [])
    assert looked_up(table, "") == ([], [])


def test_normal_form() -> None:
    assert normalize("DB.Example.COM.") == "db.example.com"
    assert normalize("*.Example.com") == "*.example.com"
    assert normalize("a.example..") == "a.example."  # one trailing dot only


def test_the_module_is_sans_io() -> None:
    tree = ast.parse(Path(l4proxy.names.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported <= {"__future__", "typing", "collections"}
