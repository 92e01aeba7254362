"""The SNI/ALPN router, sans-IO."""

from __future__ import annotations

from hypothesis import given, strategies as st

from l4proxy.routing import Route, Router

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


def test_the_route_is_named_by_the_pattern_that_matched() -> None:
    router = Router([(("DB.Example.com.", "*.Example.COM"), (), "pool")], default="default")
    assert name_of(router.match("db.example.com", ())) == "db.example.com"
    assert name_of(router.match("x.example.com", ())) == "*.example.com"
    assert name_of(router.match("elsewhere.org", ())) == "default"
    assert name_of(router.match(None, ())) == "default"


def test_an_empty_first_label_is_not_matched_by_a_wildcard() -> None:
    router = Router(ROUTES, default="default")
    assert pool(router, ".example.com") == "default"


def name_of(route: Route[str] | None) -> str | None:
    return None if route is None else route.name


_few_labels = st.sampled_from(["a", "b", "db", "example", "com"])
_name = st.lists(_few_labels, min_size=1, max_size=3).map(".".join)
_sni = st.one_of(_name, _name.map(lambda name: f"*.{name}"))
_protocols = st.lists(st.sampled_from(["h2", "http/1.1", "postgresql"]), max_size=2, unique=True)
_routes = st.lists(
    st.tuples(
        st.lists(_sni, min_size=1, max_size=2, unique=True).map(tuple), _protocols.map(tuple)
    ),
    max_size=6,
)


def reference_match(
    routes: list[tuple[tuple[str, ...], tuple[str, ...]]],
    default: bool,
    name: str | None,
    offered: tuple[bytes, ...],
) -> tuple[str, int] | None:
    """Routes in file order: every exact pattern first, then every wildcard, label by label."""
    if name:
        labels = name.lower().removesuffix(".").split(".")
        for want_wildcard in (False, True):
            for index, (patterns, alpn) in enumerate(routes):
                for pattern in patterns:
                    wanted = pattern.split(".")
                    if (wanted[0] == "*") != want_wildcard:
                        continue
                    fits = not alpn or any(p.encode() in offered for p in alpn)
                    same = (
                        labels[1:] == wanted[1:] and len(labels) == len(wanted) and labels[0] != ""
                        if want_wildcard
                        else labels == wanted
                    )
                    if same and fits:
                        return pattern, index
    return ("default", -1) if default else None


@given(_routes, st.booleans(), st.one_of(st.none(), _name, _name.map(str.upper)), _protocols)
def test_the_router_agrees_with_a_linear_reference(
    routes: list[tuple[tuple[str, ...], tuple[str, ...]]],
    default: bool,
    name: str | None,
    offered: list[str],
) -> None:
    router = Router(
        [(patterns, alpn, index) for index, (patterns, alpn) in enumerate(routes)],
        default=-1 if default else None,
    )
    alpn = tuple(protocol.encode() for protocol in offered)
    route = router.match(name, alpn)
    got = None if route is None else (route.name, route.pool)
    assert got == reference_match(routes, default, name, alpn)
