"""The sans-IO PostgreSQL preamble: every path by example, then hostile bytes on both sides.

``run`` drives a dialogue the way :mod:`l4proxy.preamble` does (bytes only when asked, at
most ``RECEIVE_SIZE`` at a time, ``b""`` at the end) and checks the driver's contract at
every event, so each test, by example or by hypothesis, also checks the contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from l4proxy.protocols.dialogue import (
    RECEIVE_SIZE,
    Close,
    ConnectBackend,
    ConnectSessionOwner,
    DialogueSettings,
    Done,
    Event,
    NeedBackendData,
    NeedClientData,
    SendToBackend,
    SendToClient,
    SessionKey,
    StartBackendTLS,
    StartClientTLS,
)
from l4proxy.protocols.postgres import (
    ALPN_PROTOCOLS,
    BUFFER_LIMIT,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_MESSAGE_LENGTH,
    POSTGRES,
    SSL_REQUEST,
    TLS_REQUIRED_MESSAGE,
    PostgresDialogue,
    error_response,
)
from l4proxy.record import Outcome

TLS_ONLY = DialogueSettings()
PLAINTEXT = DialogueSettings(allow_plaintext=True)
BACKEND_TLS = DialogueSettings(allow_plaintext=True, backend_tls=True)


def packet(code: int, body: bytes = b"") -> bytes:
    """A startup-phase packet: length (itself included), code, body."""
    return (8 + len(body)).to_bytes(4, "big") + code.to_bytes(4, "big") + body


def startup(version: int = 196608, user: str = "alice") -> bytes:
    return packet(version, b"user\0" + user.encode() + b"\0database\0app\0\0")


def message(kind: bytes, body: bytes = b"") -> bytes:
    """A regular message: type byte, length (itself included, not the type), body."""
    return kind + (4 + len(body)).to_bytes(4, "big") + body


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", code.to_bytes(4, "big") + data)


def key_data(secret: bytes = b"\x0b\xad\xf0\x0d", pid: int = 4242) -> bytes:
    return message(b"K", pid.to_bytes(4, "big") + secret)


GSSENC_REQUEST = packet(GSSENC_REQUEST_CODE)
KEY = (4242).to_bytes(4, "big") + b"\x0b\xad\xf0\x0d"
CANCEL = packet(CANCEL_REQUEST_CODE, KEY)
PARAMETER = message(b"S", b"server_version\x0017.2\x00")
READY = message(b"Z", b"I")
FATAL = message(b"E", b"SFATAL\x00C28P01\x00Mpassword authentication failed\x00\x00")
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
QUERY = message(b"Q", b"select 1\x00")


def error_fields(data: bytes) -> dict[str, str]:
    """The fields of one ErrorResponse, checking its framing on the way."""
    assert data[:1] == b"E"
    assert int.from_bytes(data[1:5], "big") == len(data) - 1
    assert data.endswith(b"\0\0")
    return {field[:1]: field[1:] for field in data[5:-2].decode().split("\0")}


@attrs.define
class Run:
    """What a driven dialogue did, and what it left unread (the data phase's to move
    after :class:`Done`)."""

    events: list[Event]
    unread_client: bytes
    unread_backend: bytes

    @property
    def final(self) -> Event:
        return self.events[-1]

    @property
    def to_client(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, SendToClient))

    @property
    def to_backend(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, SendToBackend))

    @property
    def keys(self) -> list[bytes]:
        return [e.key for e in self.events if isinstance(e, SessionKey)]


def run(settings: DialogueSettings, client: Sequence[bytes], backend: Sequence[bytes] = ()) -> Run:
    """Drive a new dialogue to its end, as the driver would, checking its contract."""
    dialogue = POSTGRES(settings)
    client_chunks = [
        c[i : i + RECEIVE_SIZE] for c in client for i in range(0, len(c), RECEIVE_SIZE)
    ]
    backend_chunks = [
        c[i : i + RECEIVE_SIZE] for c in backend for i in range(0, len(c), RECEIVE_SIZE)
    ]
    events: list[Event] = []
    client_tls = connected = backend_secured = False
    for _ in range(10_000):
        event = dialogue.next_event()
        events.append(event)
        if isinstance(event, NeedClientData):
            dialogue.receive_client(client_chunks.pop(0) if client_chunks else b"")
        elif isinstance(event, NeedBackendData):
            assert connected
            dialogue.receive_backend(backend_chunks.pop(0) if backend_chunks else b"")
        elif isinstance(event, StartClientTLS):
            assert not client_tls
            assert not connected
            assert dialogue.buffered == 0, "unconsumed cleartext bytes before TLS"
            client_tls = True
        elif isinstance(event, ConnectBackend | ConnectSessionOwner):
            assert not connected
            assert client_tls or settings.allow_plaintext or isinstance(event, ConnectSessionOwner)
            connected = True
        elif isinstance(event, SendToBackend):
            assert connected
            assert event.data
            if settings.backend_tls and not backend_secured:
                assert event.data == SSL_REQUEST, "a packet before the backend's TLS"
        elif isinstance(event, SendToClient):
            assert event.data
        elif isinstance(event, StartBackendTLS):
            assert connected
            assert settings.backend_tls
            assert not backend_secured
            backend_secured = True
        elif isinstance(event, SessionKey):
            assert connected
            assert 8 <= len(event.key) <= 260
        elif isinstance(event, Done):
            assert connected
            assert dialogue.buffered == 0, "Done while holding bytes"
            assert backend_secured or not settings.backend_tls
        if isinstance(event, Done | Close):
            assert dialogue.next_event() == event  # the end is given again if asked
            return Run(events, b"".join(client_chunks), b"".join(backend_chunks))
        assert dialogue.buffered <= 2 * BUFFER_LIMIT
    raise AssertionError(f"no end after {len(events)} events: {events[-5:]}")


# -- error_response and the factory ----------------------------------------------------


def test_error_response_bytes() -> None:
    body = b"SFATAL\0VFATAL\0C08P01\0Mbad thing\0\0"
    assert (
        error_response("FATAL", "08P01", "bad thing")
        == b"E" + (4 + len(body)).to_bytes(4, "big") + body
    )
    assert error_fields(error_response("ERROR", "28000", "é")) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "28000",
        "M": "é",
    }


def test_error_response_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        error_response("FATAL", "08P01", "a\0b")


def test_the_factory_makes_a_new_dialogue_each_time() -> None:
    assert POSTGRES.name == "postgres"
    first, second = POSTGRES(TLS_ONLY), POSTGRES(TLS_ONLY)
    assert isinstance(first, PostgresDialogue)
    assert first is not second
    assert first.next_event() == NeedClientData()


# -- the client's opening ---------------------------------------------------------------


def test_direct_tls_replays_what_was_read_and_requires_alpn() -> None:
    result = run(TLS_ONLY, [CLIENT_HELLO_START[:1], CLIENT_HELLO_START[1:]])
    assert result.events[:2] == [
        NeedClientData(),
        StartClientTLS(alpn=ALPN_PROTOCOLS, require_alpn=True, replay=b"\x16"),
    ]
    hello = run(TLS_ONLY, [CLIENT_HELLO_START], [])
    assert hello.events[1] == StartClientTLS(
        alpn=(b"postgresql",), require_alpn=True, replay=CLIENT_HELLO_START
    )


@pytest.mark.parametrize(
    ("client", "outcome"),
    [
        ([], Outcome.QUIT),
        ([b"\x00\x00\x00"], Outcome.BAD_PREAMBLE),
        ([startup()[:20]], Outcome.BAD_PREAMBLE),  # TLS not required yet: waits for all of it
    ],
)
def test_end_of_stream_before_a_whole_packet(client: list[bytes], outcome: Outcome) -> None:
    result = run(PLAINTEXT, client)
    assert result.final == Close(outcome, result.final.reason)  # type: ignore[union-attr]
    assert result.to_client == b""


@pytest.mark.parametrize("length", [0, 7, 10001, 0x7FFFFFFF])
def test_a_length_out_of_range_closes_without_a_word(length: int) -> None:
    result = run(PLAINTEXT, [length.to_bytes(4, "big") + (196608).to_bytes(4, "big")])
    assert result.events == [
        NeedClientData(),
        Close(Outcome.BAD_PREAMBLE, f"startup packet length {length} out of range"),
    ]


def test_ssl_request_is_answered_s_then_tls() -> None:
    result = run(TLS_ONLY, [SSL_REQUEST[:3], SSL_REQUEST[3:], startup()])
    assert result.events[:5] == [
        NeedClientData(),
        NeedClientData(),
        SendToClient(b"S"),
        StartClientTLS(alpn=ALPN_PROTOCOLS, require_alpn=False, replay=b""),
        NeedClientData(),
    ]
    assert result.events[5:7] == [ConnectBackend(), SendToBackend(startup())]


@pytest.mark.parametrize(
    ("request_packet", "name"), [(SSL_REQUEST, "SSL"), (GSSENC_REQUEST, "GSSAPI encryption")]
)
@pytest.mark.parametrize("pipelined", [CLIENT_HELLO_START, startup(), b"\x00"])
def test_bytes_pipelined_after_an_encryption_request_are_refused(
    request_packet: bytes, name: str, pipelined: bytes
) -> None:
    """CVE-2021-23214: nothing sent before the answer may reach the TLS session."""
    result = run(PLAINTEXT, [request_packet + pipelined])
    reason = f"received unencrypted data after {name} request"
    assert result.events == [
        NeedClientData(),
        SendToClient(error_response("FATAL", "08P01", reason)),
        Close(Outcome.BAD_PREAMBLE, reason),
    ]


def test_gssenc_is_refused_then_ssl_may_follow() -> None:
    result = run(TLS_ONLY, [GSSENC_REQUEST, SSL_REQUEST, startup()])
    assert result.events[:6] == [
        NeedClientData(),
        SendToClient(b"N"),
        NeedClientData(),
        SendToClient(b"S"),
        StartClientTLS(alpn=ALPN_PROTOCOLS),
        NeedClientData(),
    ]


def test_gssenc_then_cleartext_startup_when_plaintext_is_allowed() -> None:
    result = run(PLAINTEXT, [GSSENC_REQUEST, startup()])
    assert result.events[:5] == [
        NeedClientData(),
        SendToClient(b"N"),
        NeedClientData(),
        ConnectBackend(),
        SendToBackend(startup()),
    ]


@pytest.mark.parametrize(
    ("second", "outcome"),
    [
        (CLIENT_HELLO_START, Outcome.BAD_PREAMBLE),  # direct TLS only as the very first thing
        (GSSENC_REQUEST, Outcome.BAD_PREAMBLE),
        (b"", Outcome.QUIT),
    ],
)
def test_after_gssenc_refusal(second: bytes, outcome: Outcome) -> None:
    result = run(PLAINTEXT, [GSSENC_REQUEST, second])
    assert isinstance(result.final, Close)
    assert result.final.outcome is outcome
    assert not any(isinstance(e, StartClientTLS) for e in result.events)


def test_an_encryption_request_of_the_wrong_length() -> None:
    result = run(TLS_ONLY, [packet(80877103, b"\0\0\0\0")])
    assert result.final == Close(Outcome.BAD_PREAMBLE, "SSL request of length 12")


@pytest.mark.parametrize("secret_size", [4, 32, 256])
def test_a_cancel_request_goes_to_the_session_owner(secret_size: int) -> None:
    key = (77).to_bytes(4, "big") + bytes(i % 256 for i in range(secret_size))
    cancel = packet(CANCEL_REQUEST_CODE, key)
    result = run(TLS_ONLY, [cancel[:10], cancel[10:] + b"trailing"])
    assert result.events == [
        NeedClientData(),
        NeedClientData(),
        ConnectSessionOwner(key),
        SendToBackend(cancel),
        Close(Outcome.CANCEL_FORWARDED),
    ]


def test_a_cancel_request_inside_tls() -> None:
    """libpq 17's PQcancelConn: SSLRequest, TLS, then the cancel inside it."""
    result = run(TLS_ONLY, [SSL_REQUEST, CANCEL])
    assert result.events[-3:] == [
        ConnectSessionOwner(KEY),
        SendToBackend(CANCEL),
        Close(Outcome.CANCEL_FORWARDED),
    ]


def test_a_cancel_request_crosses_to_a_tls_backend_inside_tls() -> None:
    result = run(BACKEND_TLS, [CANCEL], [b"S"])
    assert result.events == [
        NeedClientData(),
        ConnectSessionOwner(KEY),
        SendToBackend(SSL_REQUEST),
        NeedBackendData(),
        StartBackendTLS(),
        SendToBackend(CANCEL),
        Close(Outcome.CANCEL_FORWARDED),
    ]


@pytest.mark.parametrize("secret_size", [0, 3, 257])
def test_a_cancel_request_of_the_wrong_length(secret_size: int) -> None:
    result = run(TLS_ONLY, [packet(CANCEL_REQUEST_CODE, b"\0\0\0\1" + b"k" * secret_size)])
    assert result.final == Close(
        Outcome.BAD_PREAMBLE, f"cancel request of length {12 + secret_size}"
    )
    assert result.to_client == b""


def test_cleartext_startup_is_refused_when_tls_is_required() -> None:
    # Refused only once the whole packet is in: closing with unread bytes would be a
    # reset, which some client stacks let overtake the ErrorResponse.
    result = run(TLS_ONLY, [startup()[:8], startup()[8:]])
    assert [type(e) for e in result.events] == [
        NeedClientData, NeedClientData, SendToClient, Close
    ]  # fmt: skip
    assert error_fields(result.to_client) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28000",
        "M": TLS_REQUIRED_MESSAGE,
    }
    assert result.final == Close(Outcome.TLS_REQUIRED, TLS_REQUIRED_MESSAGE)


@pytest.mark.parametrize("version", [196608, 196610])
def test_cleartext_startup_when_allowed(version: int) -> None:
    result = run(PLAINTEXT, [startup(version)[:9], startup(version)[9:]])
    assert result.events[:4] == [
        NeedClientData(),
        NeedClientData(),
        ConnectBackend(),
        SendToBackend(startup(version)),
    ]


@pytest.mark.parametrize(
    ("code", "text"), [(131072, "2.0"), (80877105, "1234.5681"), (0x12345678, "4660.22136")]
)
@pytest.mark.parametrize("settings", [TLS_ONLY, PLAINTEXT])
def test_an_unsupported_protocol_is_refused(
    code: int, text: str, settings: DialogueSettings
) -> None:
    result = run(settings, [packet(code, b"x" * 20)])
    message_text = f"unsupported frontend protocol {text}: l4proxy relays 3.x"
    assert result.events == [
        NeedClientData(),
        SendToClient(error_response("FATAL", "08P01", message_text)),
        Close(Outcome.BAD_PREAMBLE, message_text),
    ]


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (SSL_REQUEST, "SSL request inside TLS"),
        (GSSENC_REQUEST, "GSSAPI encryption request inside TLS"),
        (packet(2, b"garbage!"), "unsupported frontend protocol 0.2: l4proxy relays 3.x"),
    ],
)
def test_inside_tls_only_a_startup_or_a_cancel(first: bytes, reason: str) -> None:
    result = run(TLS_ONLY, [CLIENT_HELLO_START, first])
    assert result.events[-2:] == [
        SendToClient(error_response("FATAL", "08P01", reason)),
        Close(Outcome.BAD_PREAMBLE, reason),
    ]


def test_inside_tls_cleartext_rules_do_not_apply() -> None:
    """The startup packet inside TLS connects even without allow_plaintext; a client
    that closes right after the handshake quits."""
    assert run(TLS_ONLY, [CLIENT_HELLO_START, startup()]).events[3:5] == [
        ConnectBackend(),
        SendToBackend(startup()),
    ]
    assert run(TLS_ONLY, [CLIENT_HELLO_START]).final == Close(
        Outcome.QUIT, "client closed before its startup packet"
    )


# -- the backend: its TLS ----------------------------------------------------------------


def test_backend_tls_before_the_startup_packet() -> None:
    result = run(BACKEND_TLS, [startup()], [b"S", READY])
    assert result.events == [
        NeedClientData(),
        ConnectBackend(),
        SendToBackend(SSL_REQUEST),
        NeedBackendData(),
        StartBackendTLS(),
        SendToBackend(startup()),
        NeedBackendData(),
        SendToClient(READY),
        Done(),
    ]


@pytest.mark.parametrize(
    ("answer", "outcome", "reason"),
    [
        (b"N", Outcome.BACKEND_TLS_FAILED, "backend refused TLS (answered 'N' to SSLRequest)"),
        (b"S\x16\x03", Outcome.BACKEND_PREAMBLE_FAILED, "backend sent data after 'S' before TLS"),
        (FATAL, Outcome.BACKEND_PREAMBLE_FAILED, "backend answered b'E' to SSLRequest"),
        (b"", Outcome.BACKEND_PREAMBLE_FAILED, "backend closed before answering SSLRequest"),
    ],
)
def test_backend_tls_refused_or_garbled(answer: bytes, outcome: Outcome, reason: str) -> None:
    result = run(BACKEND_TLS, [startup()], [answer])
    assert result.events[-2:] == [NeedBackendData(), Close(outcome, reason)]
    assert result.to_backend == SSL_REQUEST


# -- the backend: the startup messages ----------------------------------------------------


def test_trust_auth_one_batch_one_send_key_first() -> None:
    batch = auth(0) + PARAMETER + PARAMETER + key_data() + READY
    result = run(PLAINTEXT, [startup()], [batch])
    assert result.events[3:] == [
        NeedBackendData(),
        SessionKey(KEY),
        SendToClient(batch),
        Done(),
    ]


def test_messages_are_passed_on_at_message_boundaries() -> None:
    stream = auth(0) + PARAMETER + key_data() + READY
    cut = len(auth(0)) + 3  # in the middle of the ParameterStatus
    result = run(PLAINTEXT, [startup()], [stream[:cut], stream[cut:]])
    assert result.events[3:] == [
        NeedBackendData(),
        SendToClient(auth(0)),
        NeedBackendData(),
        SessionKey(KEY),
        SendToClient(stream[len(auth(0)) :]),
        Done(),
    ]


def test_a_protocol_3_2_key_of_256_bytes() -> None:
    secret = bytes(range(256))
    result = run(PLAINTEXT, [startup(196610)], [auth(0) + key_data(secret) + READY])
    assert result.keys == [(4242).to_bytes(4, "big") + secret]


def test_scram_answers_pass_one_message_at_a_time() -> None:
    first = message(b"p", b"SCRAM-SHA-256\0" + (10).to_bytes(4, "big") + b"n,,n=,r=abc")
    second = message(b"p", b"c=biws,r=abcdef,p=proof")
    sasl = auth(10, b"SCRAM-SHA-256\0\0")
    sasl_continue = auth(11, b"r=abcdef,s=salt,i=4096")
    final = auth(12, b"v=sig") + auth(0) + PARAMETER + key_data() + READY
    result = run(
        PLAINTEXT,
        [startup(), first[:4], first[4:], second + QUERY],  # a Query pipelined at the end
        [sasl, sasl_continue, final],
    )
    assert result.events == [
        NeedClientData(),
        ConnectBackend(),
        SendToBackend(startup()),
        NeedBackendData(),
        SendToClient(sasl),
        NeedClientData(),
        NeedClientData(),
        SendToBackend(first),
        NeedBackendData(),
        SendToClient(sasl_continue),
        NeedClientData(),
        SendToBackend(second),
        NeedBackendData(),
        SessionKey(KEY),
        SendToClient(final),
        SendToBackend(QUERY),  # held until the hand-over
        Done(),
    ]


def test_client_bytes_after_the_startup_packet_wait_for_an_answer_or_the_end() -> None:
    password = message(b"p", b"secret\0")
    result = run(PLAINTEXT, [startup() + password], [auth(3), auth(0) + READY])
    assert result.events[2:] == [
        SendToBackend(startup()),
        NeedBackendData(),
        SendToClient(auth(3)),
        SendToBackend(password),  # already read: not asked for again
        NeedBackendData(),
        SendToClient(auth(0) + READY),
        Done(),
    ]


def test_an_error_response_ends_the_relay() -> None:
    md5 = message(b"p", b"md5" + b"0" * 32 + b"\0")
    result = run(PLAINTEXT, [startup(), md5], [auth(5, b"salt"), FATAL])
    assert result.events[-3:] == [NeedBackendData(), SendToClient(FATAL), Done()]
    assert result.final == Done()


def test_gss_continue_hands_over_at_once() -> None:
    """The client answers AuthenticationGSSContinue only if its context is incomplete."""
    result = run(PLAINTEXT, [startup(), message(b"p", b"token")], [auth(7), auth(8, b"tok")])
    assert result.events[-3:] == [NeedBackendData(), SendToClient(auth(8, b"tok")), Done()]
    assert result.keys == []


@pytest.mark.parametrize(
    "unexpected",
    [
        auth(2),  # Kerberos V5, long gone
        auth(99),
        message(b"R", b"\0\0"),  # too short for a code
        key_data(b"\0\0\0"),  # a secret shorter than 4 bytes
        key_data(b"k" * 257),
        key_data() + key_data(),  # a second key
    ],
)
def test_the_unexpected_hands_over_with_everything_held(unexpected: bytes) -> None:
    tail = PARAMETER + b"\x00partial"
    result = run(PLAINTEXT, [startup() + QUERY], [auth(0) + unexpected + tail])
    assert result.final == Done()
    assert result.to_client == auth(0) + unexpected + tail
    assert result.to_backend == startup() + QUERY
    assert len(result.keys) <= 1


def test_a_message_over_the_cap_hands_over() -> None:
    header = b"S" + (MAX_MESSAGE_LENGTH + 1).to_bytes(4, "big")
    result = run(PLAINTEXT, [startup()], [auth(0) + header])
    assert result.events[-2:] == [SendToClient(auth(0) + header), Done()]


def test_a_message_at_the_cap_is_read_whole_within_the_buffer_limit() -> None:
    notice = message(b"N", b"x" * (MAX_MESSAGE_LENGTH - 4))
    result = run(PLAINTEXT, [startup()], [notice + READY])
    sends = [e for e in result.events if isinstance(e, SendToClient)]
    assert sends == [SendToClient(notice + READY)]


def test_an_auth_answer_over_the_cap_hands_over() -> None:
    answer = b"p" + (MAX_MESSAGE_LENGTH + 1).to_bytes(4, "big") + b"token"
    result = run(PLAINTEXT, [startup(), answer], [auth(10, b"SCRAM-SHA-256\0\0") + PARAMETER])
    assert result.events[-3:] == [SendToClient(PARAMETER), SendToBackend(answer), Done()]


def test_the_backend_closing_during_startup() -> None:
    result = run(PLAINTEXT, [startup()], [auth(0) + PARAMETER[:3]])
    assert result.events[-5:] == [
        NeedBackendData(),
        SendToClient(auth(0)),
        NeedBackendData(),
        SendToClient(PARAMETER[:3]),  # all it said is passed on
        Close(Outcome.BACKEND_PREAMBLE_FAILED, "backend closed during startup"),
    ]


def test_the_client_closing_during_authentication() -> None:
    result = run(PLAINTEXT, [startup(), b"p\0\0"], [auth(3)])
    assert result.events[-2:] == [
        NeedClientData(),
        Close(Outcome.QUIT, "client closed during authentication"),
    ]


# -- hypothesis: hostile bytes, any chunking ---------------------------------------------


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """``data`` cut at arbitrary places."""
    whole = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    return [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True) if b > a]


def joined(parts: st.SearchStrategy[bytes], max_size: int = 8) -> st.SearchStrategy[bytes]:
    return st.lists(parts, max_size=max_size).map(b"".join)


OPENINGS = st.sampled_from(
    [b"", SSL_REQUEST, GSSENC_REQUEST, startup(), startup(196610), CANCEL, CLIENT_HELLO_START]
)
CLIENT_BYTES = st.one_of(
    OPENINGS,
    st.binary(max_size=24),
    st.tuples(st.sampled_from(b"pQX"), st.binary(max_size=24)).map(
        lambda kb: message(bytes([kb[0]]), kb[1])
    ),
)
BACKEND_MESSAGES = st.one_of(
    st.sampled_from(
        [
            auth(0),
            auth(3),
            auth(5, b"salt"),
            auth(7),
            auth(8, b"tok"),
            auth(10, b"SCRAM-SHA-256\0\0"),
            auth(11, b"r=x"),
            auth(12, b"v=y"),
            PARAMETER,
            READY,
            FATAL,
            key_data(),
        ]
    ),
    st.binary(min_size=4, max_size=300).map(lambda body: message(b"K", body)),
    st.tuples(st.sampled_from(b"RKSZENv"), st.binary(max_size=24)).map(
        lambda kb: message(bytes([kb[0]]), kb[1])
    ),
    st.binary(max_size=12),
    # a header declaring a large message, then some of it
    st.tuples(st.integers(4, MAX_MESSAGE_LENGTH + 2), st.integers(0, 3 * RECEIVE_SIZE)).map(
        lambda sizes: b"N" + sizes[0].to_bytes(4, "big") + b"n" * sizes[1]
    ),
)
SETTINGS = st.builds(DialogueSettings, backend_tls=st.booleans(), allow_plaintext=st.booleans())


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    settings=SETTINGS,
    client=chunked(joined(CLIENT_BYTES)),
    backend=chunked(
        st.tuples(st.sampled_from([b"", b"S", b"N"]), joined(BACKEND_MESSAGES)).map(b"".join)
    ),
)
def test_arbitrary_bytes_keep_the_contract(
    settings: DialogueSettings, client: list[bytes], backend: list[bytes]
) -> None:
    run(settings, client, backend)  # every check is in the driver


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    backend_tls=st.booleans(),
    client=chunked(joined(CLIENT_BYTES, max_size=4)),
    backend=chunked(joined(BACKEND_MESSAGES)),
)
def test_after_the_startup_packet_nothing_is_lost_or_invented(
    backend_tls: bool, client: list[bytes], backend: list[bytes]
) -> None:
    """The relay is transparent: what it passes on each way is a prefix of what it
    received (all of it when it hands over), whatever the bytes."""
    settings = DialogueSettings(allow_plaintext=True, backend_tls=backend_tls)
    result = run(settings, [startup(), *client], [b"S", *backend] if backend_tls else backend)
    sent_on = result.to_backend.removeprefix(SSL_REQUEST) if backend_tls else result.to_backend
    client_stream, backend_stream = startup() + b"".join(client), b"".join(backend)
    assert client_stream.startswith(sent_on)
    assert backend_stream.startswith(result.to_client)
    if result.final == Done():
        assert sent_on + result.unread_client == client_stream
        assert result.to_client + result.unread_backend == backend_stream
    else:
        assert isinstance(result.final, Close)
        assert result.final.outcome in {Outcome.QUIT, Outcome.BACKEND_PREAMBLE_FAILED}
    assert all(key in backend_stream for key in result.keys)


@hypothesis_settings(max_examples=200, deadline=None)
@given(client=chunked(joined(CLIENT_BYTES, max_size=4)), backend=chunked(joined(BACKEND_MESSAGES)))
def test_after_the_startup_packet_chunking_changes_nothing(
    client: list[bytes], backend: list[bytes]
) -> None:
    """Same bytes, same end: what each peer gets in the end (the data phase moving what
    the dialogue left unread) and the key do not depend on how the bytes arrive."""
    split = run(PLAINTEXT, [startup(), *client], backend)
    whole = run(PLAINTEXT, [startup(), b"".join(client)], [b"".join(backend)])
    assert (split.final, split.keys) == (whole.final, whole.keys)
    if split.final == Done():
        assert split.to_client + split.unread_backend == whole.to_client + whole.unread_backend
        assert split.to_backend + split.unread_client == whole.to_backend + whole.unread_client
    else:
        assert (split.to_client, split.to_backend) == (whole.to_client, whole.to_backend)
