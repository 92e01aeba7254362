"""The SNI/ALPN router, sans-IO."""

from __future__ import annotations

from hypothesis import given, strategies as st

from l4proxy.routing import Router

ROUTES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("db.example.com",), (), "db"),
    (("*.example.com",), (), "wildcard"),
    (("api.example.com",), ("h2",), "api-h2"),
    (("api.example.com",), (), "api"),
    (("pg.example.com",), ("postgresql",), "pg-only"),
]


def pool(router: Router[str], sni: str | None, alpn: tuple[bytes, ...] = ()) -> str | None:
    route = router.match(sni, alpn)
    return None if route is None else route.pool


def test_exact_beats_wildcard_beats_default() -> None:
    router = Router(ROUTES, default="default")
    assert pool(router, "db.example.com") == "db"
    assert pool(router, "other.example.com") == "wildcard"
    assert pool(router, "example.com") == "default"  # a wildcard needs one more label
    assert pool(router, "a.b.example.com") == "default"  # and only one
    assert pool(router, "elsewhere.org") == "default"
    assert pool(router, None) == "default"


def test_case_and_trailing_dot_do_not_matter() -> None:
    router = Router(ROUTES)
    assert pool(router, "DB.Example.COM.") == "db"
    assert pool(router, "X.EXAMPLE.com") == "wildcard"


def test_alpn_selects_among_routes_for_one_name() -> None:
    router = Router(ROUTES)
    assert pool(router, "api.example.com", (b"h2", b"http/1.1")) == "api-h2"
    assert pool(router, "api.example.com", (b"http/1.1",)) == "api"
    # A route that needs an ALPN the client did not offer falls through to the wildcard.
    assert pool(router, "pg.example.com", (b"h2",)) == "wildcard"
    assert pool(router, "pg.example.com", (b"postgresql",)) == "pg-only"


def test_no_route_and_no_default() -> None:
    router = Router(ROUTES)
    assert pool(router, "elsewhere.org") is None
    assert pool(router, None) is None
    assert router.match("db.example.com", ()).name == "db.example.com"  # type: ignore[union-attr]


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=5), st.booleans())
def test_an_exact_route_always_wins_for_its_own_name(labels: list[str], upper: bool) -> None:
    name = ".".join(labels)
    router = Router([((f"*.{name}",), (), "wildcard"), ((name,), (), "exact")], default="default")
    assert pool(router, name.upper() if upper else name) == "exact"
    assert pool(router, f"x.{name}") == "wildcard"
