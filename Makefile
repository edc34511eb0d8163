# Everything installs itself: a fresh machine needs only `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the tests and demo need: systemd-analyze (unit checks), bwrap (sandbox),
# dockerd and a static busybox (the Docker placement tests import an image made from it).
APT_PACKAGES := systemd bubblewrap docker.io busybox-static
APT_COMMANDS := systemd-analyze bwrap dockerd busybox

.PHONY: all venv sysdeps test lint unit integration demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@missing=""; for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi

lint: $(STAMP)
	$(BIN)/ruff check assetd tests bench examples
	$(BIN)/ruff format --check assetd tests bench examples
	$(BIN)/mypy

test: lint sysdeps
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q --ignore=tests/integration

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

demo: $(STAMP) sysdeps
	$(BIN)/python examples/demo.py

bench: $(STAMP) sysdeps
	$(BIN)/python bench/cold_fetch.py --profile loopback,wan --repeats 5
	$(BIN)/python bench/hit_latency.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/inject.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
