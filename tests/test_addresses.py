from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from l4proxy import TCPAddress, UnixAddress, parse_address


@pytest.mark.parametrize(
    ("text", "role", "expected"),
    [
        ("127.0.0.1:5432", "backend", TCPAddress("127.0.0.1", 5432)),
        ("db.internal:5432", "backend", TCPAddress("db.internal", 5432)),
        ("localhost.:1", "backend", TCPAddress("localhost.", 1)),
        ("[::1]:6379", "backend", TCPAddress("::1", 6379)),
        ("[fe80::1%lo]:80", "listen", TCPAddress("fe80::1%lo", 80)),
        (":5432", "listen", TCPAddress(None, 5432)),
        ("127.0.0.1:0", "listen", TCPAddress("127.0.0.1", 0)),
        ("unix:/run/pg/.s.PGSQL.5432", "backend", UnixAddress("/run/pg/.s.PGSQL.5432")),
        ("unix:relative.sock", "listen", UnixAddress("relative.sock")),
    ],
)
def test_valid_forms(text: str, role: str, expected: object) -> None:
    assert parse_address(text, role=role) == expected  # type: ignore[arg-type]
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "role", "message"),
    [
        ("5432", "listen", "did you mean ':5432'"),
        ("db", "backend", "expected HOST:PORT"),
        (":5432", "backend", "a backend needs a host"),
        ("127.0.0.1:0", "backend", "port must be 1-65535"),
        ("127.0.0.1:65536", "listen", "port must be 0-65535"),
        ("127.0.0.1:http", "backend", "port must be a number"),
        ("127.0.0.1:", "backend", "port must be a number"),
        ("::1:80", "backend", "IPv6 addresses need brackets"),
        ("[not-v6]:80", "backend", "is not an IPv6 address"),
        ("bad_host!:80", "backend", "not a valid host name"),
        ("1.2.3.256:80", "backend", "not a valid host name"),
        ("unix:", "listen", "empty unix socket path"),
        ("127.0.0.1:٣", "backend", "port must be a number"),
    ],
)
def test_invalid_forms_say_what_is_wrong(text: str, role: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_address(text, role=role)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


_labels = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_tcp = st.builds(
    TCPAddress,
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.lists(_labels, min_size=1, max_size=4).map(".".join),
    ),
    st.integers(1, 65535),
)
_unix = st.builds(UnixAddress, st.text(min_size=1).filter(lambda p: "\0" not in p))


@given(st.one_of(_tcp, _unix))
def test_str_round_trips(address: TCPAddress | UnixAddress) -> None:
    assert parse_address(str(address), role="backend") == address


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_value_error(text: str) -> None:
    try:
        parse_address(text, role="listen")
    except ValueError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
