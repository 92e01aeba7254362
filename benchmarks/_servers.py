"""Backends (nginx, iperf3 server, the idle-connection holder) and the proxies under test.

Backends run on the load core, proxies on the proxy core. Every address is 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from _procs import LOAD_CORE, PROXY_CORE, BenchError, Proc, Procs, find_binary, free_port

if TYPE_CHECKING:
    from collections.abc import Sequence

SMALL_FILE = "small.txt"
SMALL_SIZE = 64
LARGE_FILE = "large.bin"
LARGE_SIZE = 1 << 20
HERE = Path(__file__).resolve().parent
PROXIES = ("l4proxy", "haproxy", "pproxy")
#: ``bench.py --baseline DIR``: l4proxy from the source tree DIR, next to the current one.
BASELINE = "l4proxy@base"


def venv_binary(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return find_binary(name)


def l4proxy_python() -> str:
    """The interpreter the ``l4proxy`` command runs on (its script's shebang), else this one."""
    with contextlib.suppress(OSError, UnicodeDecodeError, BenchError):
        with open(venv_binary("l4proxy"), "rb") as script:
            first = script.readline(4096)
        if first.startswith(b"#!"):
            interpreter = first[2:].decode().strip()
            if " " not in interpreter and Path(interpreter).is_file():
                return interpreter
    return sys.executable


def baseline_env(tree: Path) -> dict[str, str]:
    """What makes ``python -m l4proxy`` (and ``--workers``' children) import ``tree``'s l4proxy.

    PYTHONPATH puts ``tree`` ahead of site-packages, and so ahead of the venv's editable
    install (its finder comes after the path finder). PYTHONSAFEPATH keeps the current
    directory off sys.path: ``-m`` would otherwise put it first, and run from the checkout
    that is the current l4proxy. Both are inherited by the workers
    (``python -m l4proxy.workers``).
    """
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def _python_line(argv: list[str], env: dict[str, str] | None) -> str:
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BenchError(f"{shlex.join(argv)}: {error}") from error
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(
            f"{shlex.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-800:]}"
        )
    return lines[-1].strip()


def check_baseline(tree: Path) -> tuple[str, str]:
    """(the file ``import l4proxy`` loads, its ``--version``) as the baseline proxy runs.

    Raises BenchError unless that file is ``tree``'s: the same interpreter, environment and
    current directory as the proxy that ``start_proxy`` starts for BASELINE.
    """
    python, env = l4proxy_python(), baseline_env(tree)
    imported = _python_line([python, "-c", "import l4proxy; print(l4proxy.__file__)"], env)
    expected = (tree / "l4proxy" / "__init__.py").resolve()
    if Path(imported).resolve() != expected:
        raise BenchError(
            f"with PYTHONPATH={tree}, {python} imports l4proxy from {imported}, not {expected}"
        )
    version = _python_line([python, "-m", "l4proxy", "--version"], env)
    return imported, version


def current_l4proxy_file() -> str:
    """The file ``import l4proxy`` loads for the ``l4proxy`` command (for the log)."""
    try:
        return _python_line(
            [l4proxy_python(), "-P", "-c", "import l4proxy; print(l4proxy.__file__)"], None
        )
    except BenchError as error:
        return f"unknown ({error})"


def tree_digest(tree: Path) -> str:
    """A short digest of the ``*.py`` files of ``tree``'s l4proxy package (names and bytes)."""
    digest = hashlib.sha1()
    package = tree / "l4proxy"
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def start_nginx(procs: Procs, workdir: Path) -> tuple[Proc, int, int]:
    """nginx, one worker, serving a small and a large static file over plain HTTP.

    Returns the process, its plain port and a second port whose connections must open with
    a PROXY header (v1 or v2; nginx's ``listen ... proxy_protocol``), for the edge scenario.
    """
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / SMALL_FILE).write_bytes(b"x" * (SMALL_SIZE - 1) + b"\n")
    (www / LARGE_FILE).write_bytes(os.urandom(LARGE_SIZE))
    # Started as root, nginx's worker runs as nobody: it must be able to read the files.
    for path in (workdir, www):
        path.chmod(0o755)
    for path in www.iterdir():
        path.chmod(0o644)
    port, proxied_port = free_port(), free_port()
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        listen 127.0.0.1:{proxied_port} proxy_protocol backlog=4096;
        root {www};
    }}
}}
"""
    )
    nginx = find_binary("nginx")
    proc = procs.start(
        "nginx",
        [nginx, "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(conf)],
        core=LOAD_CORE,
    )
    proc.wait_listening(port)
    proc.wait_listening(proxied_port)
    return proc, port, proxied_port


def start_iperf3_server(procs: Procs) -> tuple[Proc, int]:
    port = free_port()
    proc = procs.start(
        "iperf3-server",
        [find_binary("iperf3"), "-s", "-B", "127.0.0.1", "-p", str(port)],
        core=LOAD_CORE,
    )
    proc.wait_listening(port)
    return proc, port


def start_holder(procs: Procs) -> tuple[Proc, int]:
    """A server that answers one byte per connection and then holds it idle until EOF."""
    port = free_port()
    proc = procs.start(
        "holder", [sys.executable, str(HERE / "holdserver.py"), str(port)], core=LOAD_CORE
    )
    proc.wait_listening(port)
    return proc, port


def _haproxy_config(
    path: Path,
    listen: int,
    backend: int,
    cert: Path | None,
    maxconn: int,
    frontend: Sequence[str] = (),
    server: str = "",
) -> None:
    """``frontend``: more lines for the frontend section; ``server``: options of the server."""
    ssl = f" ssl crt {cert}" if cert is not None else ""
    more = "".join(f"    {line}\n" for line in frontend)
    server = f" {server}" if server else ""
    # The TLS 1.3 suites in the order of Debian's packaged haproxy.cfg (Mozilla
    # "intermediate"), which is also l4proxy's: both negotiate TLS_AES_128_GCM_SHA256.
    path.write_text(
        f"""global
    nbthread 1
    maxconn {maxconn}
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode tcp
    option splice-auto
    maxconn {maxconn}
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend bench
    bind 127.0.0.1:{listen}{ssl}
{more}    default_backend servers

backend servers
    server s1 127.0.0.1:{backend}{server}
"""
    )


def start_proxy(
    procs: Procs,
    kind: str,
    backend: int,
    *,
    cert: Path | None = None,
    maxconn: int = 8000,
    l4proxy_args: Sequence[str] = (),
    tag: str = "",
    baseline: Path | None = None,
    haproxy_frontend: Sequence[str] = (),
    haproxy_server: str = "",
) -> tuple[Proc, int]:
    """Start ``kind`` (l4proxy, haproxy, pproxy or BASELINE) forwarding to 127.0.0.1:``backend``.

    With ``cert`` (a PEM holding the chain and the key) the proxy terminates TLS.
    ``haproxy_frontend`` and ``haproxy_server`` are HAProxy's twins of ``l4proxy_args``
    (frontend lines, server options). BASELINE
    is l4proxy with the same arguments, run as ``python -m l4proxy`` by the ``l4proxy``
    command's interpreter with ``baseline_env(baseline)``.
    """
    port = free_port()
    name = f"{kind}-{tag}" if tag else kind
    argv: list[str]
    env: dict[str, str] | None = None
    if kind in ("l4proxy", BASELINE):
        if kind == "l4proxy":
            argv = [venv_binary("l4proxy")]
        elif baseline is None:
            raise BenchError(f"{BASELINE} needs a baseline source tree")
        else:
            argv = [l4proxy_python(), "-m", "l4proxy"]
            env = baseline_env(baseline)
        argv += ["-l", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{backend}"]
        if cert is not None:
            argv += ["--tls-cert", str(cert)]
        argv += list(l4proxy_args)
    elif kind == "haproxy":
        config = procs.workdir / f"{name}.cfg"
        _haproxy_config(config, port, backend, cert, maxconn, haproxy_frontend, haproxy_server)
        argv = [find_binary("haproxy"), "-db", "-f", str(config)]
    elif kind == "pproxy":
        ssl = "+ssl" if cert is not None else ""
        scheme = f"tunnel{{127.0.0.1:{backend}}}{ssl}"
        argv = [venv_binary("pproxy"), "-l", f"{scheme}://127.0.0.1:{port}"]
        if cert is not None:
            argv += ["--ssl", str(cert)]
    else:
        raise BenchError(f"unknown proxy {kind!r}")
    proc = procs.start(name, argv, core=PROXY_CORE, env=env)
    proc.wait_listening(port)
    return proc, port
