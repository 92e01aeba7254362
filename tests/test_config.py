from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from l4proxy import (
    Backend,
    CertKey,
    Config,
    ConfigError,
    HealthCheck,
    ListenerConfig,
    LogFormat,
    RouteConfig,
    TCPAddress,
    TLSConfig,
    UnixAddress,
)
from l4proxy.config import flag_for, top_level_keys
from l4proxy.configkeys import keys_of


def listeners(*items: dict[str, object]) -> dict[str, object]:
    return {"listeners": list(items)}


def problems_of(data: dict[str, object]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, source="test.toml")
    assert str(info.value).startswith("test.toml: ")
    assert "\n" not in str(info.value)
    return info.value.problems


def test_minimal_listener_gets_documented_defaults() -> None:
    config = Config.from_mapping(listeners({"listen": [":5432"], "backends": ["10.0.0.5:5432"]}))
    (listener,) = config.listeners
    assert listener.listen == (TCPAddress(None, 5432),)
    assert listener.backends == (Backend(TCPAddress("10.0.0.5", 5432)),)
    assert listener.name == ":5432"
    assert (listener.connect_timeout, listener.idle_timeout, listener.drain_timeout) == (
        5.0,
        0.0,
        30.0,
    )
    assert listener.access_log is None
    assert listener.log_format is LogFormat.TEXT


def test_top_level_settings_are_defaults_and_listeners_override_them() -> None:
    config = Config.from_mapping(
        {
            "connect_timeout": 2,
            "idle_timeout": 60,
            "log_format": "json",
            "access_log": "-",
            "listeners": [
                {"name": "pg", "listen": "127.0.0.1:5432", "backends": ["unix:/run/pg.sock"]},
                {
                    "name": "redis",
                    "listen": [":6379"],
                    "backends": ["r1:6379", "r2:6379"],
                    "idle_timeout": 5.5,
                },
            ],
        }
    )
    pg, redis = config.listeners
    assert pg.connect_timeout == redis.connect_timeout == 2.0
    assert (pg.idle_timeout, redis.idle_timeout) == (60.0, 5.5)
    assert pg.log_format is redis.log_format is LogFormat.JSON
    assert pg.backends == (Backend(UnixAddress("/run/pg.sock")),)
    assert pg.listen == (TCPAddress("127.0.0.1", 5432),)


def test_unknown_keys_are_named_with_a_suggestion() -> None:
    problems = problems_of(
        {
            "conect_timeout": 1,
            "listeners": [{"listen": [":1"], "backend": ["a:1"], "backends": ["a:1"]}],
        }
    )
    assert "conect_timeout: unknown key (did you mean 'connect_timeout'?)" in problems
    assert "listeners[0].backend: unknown key (did you mean 'backends'?)" in problems


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    problems = problems_of(
        listeners(
            {"listen": [":1"], "backends": ["a:1"]},
            {
                "listen": [":2"],
                "backends": ["ok:1", "db1"],
                "idle_timeout": -1,
                "log_format": "xml",
            },
        )
    )
    assert any(p.startswith("listeners[1].backends[1]: expected HOST:PORT") for p in problems)
    assert "listeners[1].idle_timeout: expected a number of seconds >= 0, got -1" in problems
    assert "listeners[1].log_format: expected one of 'text', 'json', got 'xml'" in problems
    assert len(problems) == 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "listeners: at least one [[listeners]] table is required"),
        ({"listeners": {"listen": 1}}, "listeners: expected an array of tables, got a table"),
        (listeners("x"), "listeners[0]: expected a table, got a string"),
        (listeners({"backends": ["a:1"]}), "listeners[0].listen: required (a list of addresses)"),
        (listeners({"listen": [":1"]}), "listeners[0].backends: required (a list of addresses)"),
        (
            listeners({"listen": [], "backends": ["a:1"]}),
            "listeners[0].listen: needs at least one address",
        ),
        (
            listeners({"listen": [":1"], "backends": [5432]}),
            "listeners[0].backends[0]: expected an address string or a table, got an integer",
        ),
        (
            listeners({"listen": [":1"], "backends": ["a:1"], "connect_timeout": 0}),
            "listeners[0].connect_timeout: expected a number of seconds > 0, got 0",
        ),
        (
            listeners({"listen": [":1"], "backends": ["a:1"], "drain_timeout": True}),
            "listeners[0].drain_timeout: expected a number of seconds, got True",
        ),
        (
            listeners({"listen": [":1"], "backends": ["a:1"], "drain_timeout": "30s"}),
            "listeners[0].drain_timeout: expected a number of seconds, got '30s'",
        ),
        (
            listeners({"listen": [":1"], "backends": ["a:1"], "name": ""}),
            "listeners[0].name: expected a non-empty string, got ''",
        ),
        (
            listeners({"listen": [":1"], "backends": ["a:1"], "access_log": ""}),
            "listeners[0].access_log: expected a file path or '-', got ''",
        ),
        ({"listen": [":1"], "listeners": []}, "listen: belongs in a [[listeners]] table"),
        (
            {"log_level": "loud", **listeners({"listen": [":1"], "backends": ["a:1"]})},
            "log_level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], expected: str) -> None:
    assert expected in problems_of(data)


def test_duplicate_listen_addresses_and_names() -> None:
    problems = problems_of(
        listeners(
            {"name": "a", "listen": ["127.0.0.1:5432", "unix:/tmp/x.sock"], "backends": ["b:1"]},
            {"name": "a", "listen": ["127.0.0.1:5432"], "backends": ["b:1"]},
            {"name": "c", "listen": [":5432", "unix:/tmp/x.sock"], "backends": ["b:1"]},
            {"name": "d", "listen": ["[::1]:6000", ":6000"], "backends": ["b:1"]},
        )
    )
    assert "listeners[1].name: duplicate name 'a' (also listeners[0])" in problems
    assert (
        "listeners[1].listen[0]: duplicate listen address '127.0.0.1:5432' (also listeners[0].listen[0])"
        in problems
    )
    assert (
        "listeners[2].listen[0]: duplicate listen address ':5432' (also listeners[0].listen[0])"
        in problems
    )
    assert (
        "listeners[2].listen[1]: duplicate listen address 'unix:/tmp/x.sock' (also listeners[0].listen[1])"
        in problems
    )
    assert (
        "listeners[3].listen[1]: duplicate listen address ':6000' (also listeners[3].listen[0])"
        in problems
    )


def test_port_zero_never_clashes() -> None:
    config = Config.from_mapping(
        listeners({"listen": ["127.0.0.1:0", "127.0.0.1:0", ":0"], "backends": ["b:1"]})
    )
    assert len(config.listeners[0].listen) == 3


def test_load_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_text(
        'idle_timeout = 30\n[[listeners]]\nname = "pg"\nlisten = ["127.0.0.1:5432"]\nbackends = ["127.0.0.1:5433"]\n'
    )
    config = Config.load(path)
    assert config.listeners[0].name == "pg"
    assert config.listeners[0].idle_timeout == 30.0


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config file: No such file"):
        Config.load(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[listeners]\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        Config.load(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listeners]]\nlisten = [":1"]\nbackends = ["db1"]\n')
    with pytest.raises(
        ConfigError, match=r"bad\.toml: listeners\[0\]\.backends\[0\]: expected HOST:PORT"
    ):
        Config.load(bad)


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(
        '# caf\xe9\n[[listeners]]\nlisten = [":1"]\nbackends = ["a:1"]\n'.encode("latin-1")
    )
    with pytest.raises(ConfigError) as info:
        Config.load(latin1)
    assert str(info.value) == (
        f"{latin1}: invalid TOML: not UTF-8 (invalid continuation byte at line 1)"
    )


def test_classes_built_in_code_validate_too() -> None:
    listener = ListenerConfig(listen=["127.0.0.1:0"], backends=[UnixAddress("/x.sock")])
    assert listener.listen == (TCPAddress("127.0.0.1", 0),)
    with pytest.raises(ConfigError, match="backend: a backend needs a host"):
        ListenerConfig(listen=[":1"], backends=[":5432"])
    with pytest.raises(ConfigError, match="connect_timeout"):
        ListenerConfig(listen=[":1"], backends=["a:1"], connect_timeout=0)
    with pytest.raises(ConfigError, match="duplicate name"):
        Config(listeners=[ListenerConfig(listen=[":1"], backends=["a:1"], name="x")] * 2)
    with pytest.raises(ConfigError, match="at least one listener"):
        Config(listeners=[])


def test_config_is_frozen() -> None:
    config = Config.from_mapping(listeners({"listen": [":1"], "backends": ["a:1"]}))
    with pytest.raises(AttributeError):
        config.listeners[0].idle_timeout = 3  # type: ignore[misc]


def test_unnamed_port_zero_listeners_get_distinct_names() -> None:
    config = Config.from_mapping(
        listeners(
            {"listen": ["127.0.0.1:0"], "backends": ["a:1"]},
            {"listen": ["127.0.0.1:0"], "backends": ["b:1"]},
        )
    )
    assert [listener.name for listener in config.listeners] == ["127.0.0.1:0", "127.0.0.1:0#1"]


def test_cross_listener_problems_are_reported_with_per_listener_ones() -> None:
    problems = problems_of(
        listeners(
            {"name": "a", "listen": [":1"], "backends": ["a:1"]},
            {"name": "a", "listen": [":2"], "backends": ["a:1"]},
            {"listen": [":3"], "backends": ["bad"]},
        )
    )
    assert "listeners[1].name: duplicate name 'a' (also listeners[0])" in problems
    assert any(p.startswith("listeners[2].backends[0]: expected HOST:PORT") for p in problems)


def test_bad_enums_in_code_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="log_format: expected 'text' or 'json', got 'xml'"):
        ListenerConfig(listen=[":1"], backends=["a:1"], log_format="xml")
    with pytest.raises(ConfigError, match="log_level: expected one of"):
        Config(listeners=[ListenerConfig(listen=[":1"], backends=["a:1"])], log_level="loud")
    with pytest.raises(ConfigError, match="listen: needs at least one address"):
        ListenerConfig(listen=[], backends=["a:1"])


def tls_listener(**extra: object) -> dict[str, object]:
    return {"listen": [":443"], "tls": {"certs": [{"cert": "a.pem", "key": "a.key"}]}, **extra}


def test_tls_routes_and_backend_tls_from_toml_shape(tmp_path: Path) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_text(
        """
handshake_timeout = 4
[[listeners]]
name = "public"
listen = [":443"]
backends = ["127.0.0.1:8080"]
backend_tls = true
backend_ca = "ca/backends.pem"
backend_sni = "internal.example"
tls = { certs = [{cert = "a.pem", key = "/etc/a.key"}, {cert = "b.pem"}], client_ca = "ca.pem", allow_subjects = ["CN=alice"], alpn = ["h2", "http/1.1"], min_version = "1.3" }
[[listeners.routes]]
sni = ["DB.example.com."]
alpn = ["postgresql"]
backends = ["10.0.0.5:5432"]
[[listeners.routes]]
sni = ["*.example.com"]
backends = ["10.0.0.6:443"]
"""
    )
    (listener,) = Config.load(path).listeners
    assert listener.handshake_timeout == 4.0
    assert listener.tls is not None
    assert [(c.cert, c.key) for c in listener.tls.certs] == [
        (str(tmp_path / "a.pem"), "/etc/a.key"),  # relative to the file; absolute stays
        (str(tmp_path / "b.pem"), None),
    ]
    assert listener.tls.client_ca == str(tmp_path / "ca.pem")
    assert (listener.tls.alpn, listener.tls.min_version) == (("h2", "http/1.1"), "1.3")
    assert listener.backend_ca == str(tmp_path / "ca" / "backends.pem")
    assert [route.sni for route in listener.routes] == [("db.example.com",), ("*.example.com",)]
    assert listener.routes[0].alpn == ("postgresql",)
    assert listener.inspects_tls


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            tls_listener(),
            "listeners[0].backends: required (a list of addresses)",
        ),
        (
            {**tls_listener(backends=["a:1"]), "passthrough": True},
            "listeners[0].passthrough: cannot be combined with tls (terminating)",
        ),
        (
            {"listen": [":1"], "routes": [{"sni": ["a.example"], "backends": ["a:1"]}]},
            "listeners[0].routes: need tls (to terminate) or passthrough = true (to read the SNI)",
        ),
        (
            {"listen": [":1"], "backends": ["a:1"], "backend_ca": "ca.pem"},
            "listeners[0].backend_ca: needs backend_tls = true",
        ),
        (
            {"listen": [":1"], "backends": ["a:1", "unix:/run/b.sock"], "backend_tls": True},
            "listeners[0].backend_sni: needed with backend_tls for unix:/run/b.sock "
            "(no host name to verify)",
        ),
        (
            {
                "listen": [":1"],
                "passthrough": True,
                "routes": [
                    {"sni": ["a.example"], "backends": ["a:1"]},
                    {"sni": ["A.example"], "backends": ["b:1"]},
                ],
            },
            "listeners[0].routes[1].sni: 'a.example' already routed by routes[0]",
        ),
        (
            {
                "listen": [":1"],
                "passthrough": True,
                "routes": [{"sni": ["a.*.example"], "backends": ["a:1"]}],
            },
            "listeners[0].routes[0].sni: 'a.*.example' is not a valid host name (wildcards only as a whole first label: '*.example.com')",
        ),
        (
            {
                "listen": [":1"],
                "passthrough": True,
                "routes": [{"sni": ["*.com"], "backends": ["a:1"]}],
            },
            "listeners[0].routes[0].sni: a wildcard needs a domain of two or more labels, got '*.com'",
        ),
        (
            {
                "listen": [":1"],
                "passthrough": True,
                "routes": [{"sni": ["a.example"], "backend": ["a:1"]}],
            },
            "listeners[0].routes[0].backend: unknown key (did you mean 'backends'?)",
        ),
        (
            tls_listener(backends=["a:1"], tls={"certs": []}),
            "listeners[0].tls.certs: expected a non-empty list of {cert, key} tables",
        ),
        (
            tls_listener(backends=["a:1"], tls={"certs": [{"key": "a.key"}]}),
            "listeners[0].tls.certs[0].cert: required (a file path)",
        ),
        (
            tls_listener(backends=["a:1"], tls={"certs": ["a.pem"], "min_version": "1.1"}),
            'listeners[0].tls.certs[0]: expected a table like {cert = "a.pem", key = "a.key"}',
        ),
        (
            tls_listener(
                backends=["a:1"], tls={"certs": [{"cert": "a.pem"}], "min_version": "1.1"}
            ),
            "listeners[0].tls.min_version: expected '1.2' or '1.3', got '1.1'",
        ),
        (
            tls_listener(backends=["a:1"], tls={"certs": [{"cert": "a.pem"}], "allow_sans": ["x"]}),
            "listeners[0].tls.allow_subjects/allow_sans need client_ca",
        ),
        (
            tls_listener(backends=["a:1"], tls={"certs": [{"cert": "a.pem"}], "ciphers": "x"}),
            "listeners[0].tls.ciphers: unknown key (did you mean 'certs'?)",
        ),
        (
            {"listen": [":1"], "backends": ["a:1"], "passthrough": "yes"},
            "listeners[0].passthrough: expected true or false, got 'yes'",
        ),
    ],
)
def test_tls_config_problems_name_the_key(listener: dict[str, object], expected: str) -> None:
    assert expected in problems_of(listeners(listener))


def test_tls_min_version_accepts_a_toml_float() -> None:
    config = Config.from_mapping(
        listeners(
            tls_listener(backends=["a:1"], tls={"certs": [{"cert": "a.pem"}], "min_version": 1.3})
        )
    )
    assert config.listeners[0].tls is not None
    assert config.listeners[0].tls.min_version == "1.3"


def test_tls_combinations_that_cannot_work_are_refused() -> None:
    problems = problems_of(
        listeners(
            {"listen": [":1"], "backends": ["a:1"], "passthrough": True, "backend_tls": True},
            {
                "listen": [":2"],
                "backends": ["a:1"],
                "backend_tls": True,
                "backend_sni": "*.example.com",
            },
            tls_listener(
                listen=[":3"],
                backends=["a:1"],
                tls={
                    "certs": [{"cert": "a.pem"}],
                    "client_ca": "ca.pem",
                    "allow_subjects": ["alice"],
                },
            ),
        )
    )
    assert (
        "listeners[0].backend_tls: cannot be combined with passthrough (the client's TLS goes to the backend as is)"
        in problems
    )
    assert "listeners[1].backend_sni: must be a host name, not a wildcard" in problems
    assert (
        "listeners[2].tls.allow_subjects[0]: 'alice' is not an RFC 4514 name like 'CN=alice,O=Example'"
        in problems
    )


def test_workers_is_a_top_level_whole_number() -> None:
    config = Config.from_mapping(
        {"workers": 2, **listeners({"listen": ["127.0.0.1:7000"], "backends": ["a:1"]})}
    )
    assert config.workers == 2
    for bad in (0, 257, 1.5, True, "2"):
        assert f"workers: expected a whole number from 1 to 256, got {bad!r}" in problems_of(
            {"workers": bad, **listeners({"listen": [":1"], "backends": ["a:1"]})}
        )


def test_every_field_is_a_key_of_the_table() -> None:
    """A field without key() metadata could be built in code but not read from a file."""
    for cls in (Config, ListenerConfig, TLSConfig, RouteConfig, CertKey, HealthCheck):
        assert list(keys_of(cls)) == [field.name for field in attrs.fields(cls)], cls


def test_listener_settings_are_top_level_defaults_from_the_table() -> None:
    inherited = {name for name, spec in keys_of(ListenerConfig).items() if spec.inherit}
    assert inherited == {
        "connect_timeout",
        "idle_timeout",
        "drain_timeout",
        "handshake_timeout",
        "access_log",
        "log_format",
        "backend_tls",
        "backend_ca",
        "backend_sni",
        "splice",
        "allow",
        "deny",
        "max_connections_per_ip",
        "rate_per_ip",
        "per_ip_ipv6_prefix",
        "source_address",
        "proxy_protocol",
        "accept_proxy_protocol",
        "balance",
        "health_check",
    }
    assert set(top_level_keys()) == {
        "listeners", "log_level", "workers", "max_connections", "metrics", *inherited
    }  # fmt: skip
    config = Config.from_mapping(
        {
            "splice": False,
            "handshake_timeout": 3,
            **listeners({"listen": [":1"], "backends": ["a:1"]}),
        }
    )
    assert (config.listeners[0].splice, config.listeners[0].handshake_timeout) == (False, 3.0)
    assert "listeners[0].splice: expected true or false, got 1" in problems_of(
        listeners({"listen": [":1"], "backends": ["a:1"], "splice": 1})
    )


def test_kinds_check_values_given_in_code_with_the_file_messages() -> None:
    with pytest.raises(ConfigError, match=r"^splice: expected true or false, got 'yes'$"):
        ListenerConfig(listen=[":1"], backends=["a:1"], splice="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^idle_timeout: expected a number of seconds >= 0"):
        ListenerConfig(listen=[":1"], backends=["a:1"], idle_timeout=-1)
    with pytest.raises(ConfigError, match=r"^cert: expected a file path, got ''$"):
        CertKey(cert="")
    with pytest.raises(ConfigError, match=r"^workers: expected a whole number from 1 to 256"):
        Config(listeners=[ListenerConfig(listen=[":1"], backends=["a:1"])], workers=0)
    # Optional keys left unset are not checked.
    assert ListenerConfig(listen=[":1"], backends=["a:1"]).backend_ca is None


def test_flag_for_a_key_path() -> None:
    assert flag_for("listeners[0].listen[1]") == "--listen"
    assert flag_for("listeners[0].tls.certs[2].cert") == "--tls-cert"
    assert flag_for("listeners[0].tls.certs[2].key") == "--tls-key"
    assert flag_for("listeners[0].tls.min_version") == "--tls-min-version"
    assert flag_for("listeners[0].routes[3].sni") == "--route"  # the deepest key with a flag
    assert flag_for("listeners[0].backend_sni") == "--backend-sni"
    assert flag_for("idle_timeout") == "--idle-timeout"  # a top-level default
    assert flag_for("workers") == "--workers"
    assert flag_for("log_level") is None  # -v/-q move it; no flag sets it
    assert flag_for("listeners[0].name") is None
    assert flag_for("listeners[0].tls.allow_sans") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["10.0.0.1/8"], "listeners[0].allow: bad CIDR '10.0.0.1/8': 10.0.0.1/8 has host bits set"),
        (["10.0.0.0/33"], "listeners[0].allow: bad CIDR '10.0.0.0/33'"),
        (["db.example"], "listeners[0].allow: bad CIDR 'db.example'"),
        ([5], "listeners[0].allow: expected a CIDR string, got an integer"),
        (5, "listeners[0].allow: expected a list of CIDRs, got an integer"),
    ],
)
def test_allow_and_deny_take_cidrs(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping(listeners({"listen": [":1"], "backends": ["a:1"], "allow": value}))
    assert message in str(caught.value)


def test_top_level_allow_and_deny_are_listener_defaults() -> None:
    config = Config.from_mapping(
        {
            "deny": "192.0.2.0/24",
            **listeners(
                {"listen": [":1"], "backends": ["a:1"]},
                {"listen": [":2"], "backends": ["a:1"], "deny": [], "allow": ["::1"]},
            ),
        }
    )
    assert config.listeners[0].deny == ("192.0.2.0/24",)
    assert (config.listeners[1].deny, config.listeners[1].allow) == ((), ("::1",))
