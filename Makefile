# Domum Gateway: two commands.
#   make run   set everything up on a fresh machine and serve on the embedded defaults
#   make test  install what the tests need and run the whole suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= config/domum.toml
HOSTNAME ?= localhost
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
# Debian packages the real-peer tests start (sshd, PostgreSQL, Chromium, xrdp/FreeRDP, nginx...).
SYS_PKGS := openssh-server openssh-client postgresql chromium xrdp freerdp2-x11 xvfb nginx wrk socat haproxy
SYS_BINS := /usr/sbin/sshd /usr/bin/ssh /usr/lib/postgresql/15/bin/initdb /usr/bin/chromium /usr/sbin/xrdp /usr/bin/xfreerdp /usr/bin/Xvfb /usr/sbin/nginx /usr/bin/wrk /usr/bin/socat /usr/sbin/haproxy

.PHONY: run test install install-test sysdeps assets lint typecheck unit clean soak fuzz

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $@

install: $(STAMP) assets
install-test: $(TSTAMP) assets

assets:
	@if [ -f package.json ]; then \
	  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then npm ci --no-audit --no-fund --silent; fi; \
	  node scripts/build-assets.mjs; \
	fi

$(CONFIG):
	$(BIN)/domum-gateway init --config $(CONFIG) --hostname $(HOSTNAME)

run: install
	@if [ ! -f $(CONFIG) ]; then $(BIN)/domum-gateway init --config $(CONFIG) --hostname $(HOSTNAME); \
	  else echo "using $(CONFIG) (the admin token was printed by the first 'make run'; 'domum-gateway token create' makes another)"; fi
	$(BIN)/domum-gateway serve --config $(CONFIG)

sysdeps:
	@missing=""; for b in $(SYS_BINS); do [ -x $$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(SYS_PKGS) >/dev/null; \
	fi

lint: $(TSTAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check -q src tests $(wildcard bench)

typecheck: $(TSTAMP)
	$(BIN)/mypy

test: sysdeps install-test lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

# Ten minutes of the load test's mix (DOMUM_SOAK_SECONDS to change), RSS every 10 s.
soak: install-test
	$(BIN)/python bench/soak.py

# Deeper fuzzing than `make test`: many more schemathesis requests per API operation and
# the "deep" Hypothesis profile for the window, origin and decide() properties.
fuzz: sysdeps install-test
	DOMUM_FUZZ_PROFILE=deep DOMUM_FUZZ_EXAMPLES=$${DOMUM_FUZZ_EXAMPLES:-300} \
	  $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

clean:
	rm -rf $(VENV) node_modules src/domum_gateway/static/vendor .pytest_cache .mypy_cache .ruff_cache
