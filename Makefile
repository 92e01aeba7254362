# Two commands on a fresh Debian machine:  make demo  /  make test
# Each creates .venv and installs what it needs (Debian packages too, via apt-get).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite runs for real: PostgreSQL (server, psql, pgbench), Redis,
# the TLS clients openssl (s_client) and curl, Dovecot (IMAP and POP3 backends), swaks
# (an SMTP client; its --tls needs libnet-ssleay-perl), HAProxy (a real PROXY protocol parser)
# and systemd (systemd-analyze verify checks examples/l4proxy.service; nothing is started).

.PHONY: demo test lint bench bench-deps system-deps clean

demo: $(STAMP)
	@command -v nc >/dev/null || { echo "installing netcat-openbsd for the demo's nc examples"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq netcat-openbsd >/dev/null; } || true
	@command -v openssl >/dev/null || { echo "installing openssl for the demo's s_client examples"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openssl >/dev/null; } || true
	@command -v curl >/dev/null || { echo "installing curl for the demo's metrics example"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq curl >/dev/null; } || true
	$(BIN)/python -m l4proxy.demo

test: $(STAMP) system-deps lint
	$(BIN)/pytest

# make bench: l4proxy vs HAProxy, pproxy and direct, edge protection vs HAProxy, and
# PostgreSQL through the postgres preamble vs its own TLS (benchmarks/bench.py, about
# 6.5 minutes; BENCH_ARGS=--quick for
# about 2.5). Never part of make test. benchmarks/bulk.py is the older l4proxy-only bulk
# test: $(BIN)/python benchmarks/bulk.py
BENCH_ARGS ?=
PPROXY_VERSION := 2.7.9

bench: $(STAMP) bench-deps
	$(BIN)/python benchmarks/bench.py --markdown docs/performance-results.md $(BENCH_ARGS)

bench-deps:
	@missing=""; \
	  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	  command -v iperf3 >/dev/null || missing="$$missing iperf3"; \
	  command -v wrk >/dev/null || missing="$$missing wrk"; \
	  command -v openssl >/dev/null || missing="$$missing openssl"; \
	  ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi
	@$(BIN)/python -c 'import pproxy' 2>/dev/null || { echo "installing pproxy $(PPROXY_VERSION)"; \
	  $(BIN)/python -m pip install -q 'pproxy==$(PPROXY_VERSION)'; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "l4proxy needs Python >= 3.11"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

system-deps:
	@missing=""; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null || missing="$$missing redis-tools"; \
	  command -v openssl >/dev/null || missing="$$missing openssl"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  [ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/imap ] || missing="$$missing dovecot-imapd"; \
	  [ -x /usr/lib/dovecot/pop3 ] || missing="$$missing dovecot-pop3d"; \
	  command -v swaks >/dev/null || missing="$$missing swaks"; \
	  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	  perl -MNet::SSLeay -e1 2>/dev/null || missing="$$missing libnet-ssleay-perl"; \
	  command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
