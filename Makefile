# deephemnma — two commands: `make run` (the embedded demo) and `make test` (the test suite).
# Both create or reuse the virtual environment in $(VENV) and install the pinned
# dependencies (requirements/lock.txt) first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
STAMP := $(VENV)/.deps-installed
CORES ?= all
CONFIG ?= config/config.yaml
PYTEST_ARGS ?=

.PHONY: install peer browser vendor vendor-check test run bench clean help
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.deps-installed

help:
	@echo "make run    run the embedded demo workflow (config/config.yaml) into results/"
	@echo "make test   run the test suite"
	@echo "make bench  run the benchmark scripts (bench/), results in bench/results/"
	@echo "make browser        install headless Chromium for the results-page tests (root, apt-get)"
	@echo "make vendor-check   verify the page's vendored JavaScript against the npm registry"

$(BIN)/python:
	$(PYTHON) scripts/make_venv.py $(VENV)

# Horovod 0.28.1 does not build against current torch as released: scripts/install_horovod.sh
# patches its C++ standard, builds it once (minutes) and caches the wheel in
# ~/.cache/deephemnma/wheels, so later environments install it in seconds. HOROVOD=0 skips it.
HOROVOD ?= 1
$(STAMP): $(LOCK) pyproject.toml scripts/install_horovod.sh | $(BIN)/python
	$(BIN)/python -m pip install -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	if [ "$(HOROVOD)" = 1 ]; then bash scripts/install_horovod.sh $(VENV); fi
	touch $@

install: $(STAMP)

# cryoDRGN as an independent peer for the convention tests: a side environment that sees the
# main one's packages (a .pth file) and adds cryoDRGN's own. Optional: tests skip without it.
$(PEER_STAMP): requirements/peer.txt $(STAMP)
	$(PYTHON) -m venv --without-pip $(PEER_VENV) || $(PYTHON) scripts/make_venv.py $(PEER_VENV)
	$(PEER_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/deephemnma-main-venv.pth', 'w').write(sys.argv[1] + '\\n')" \
		"$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')"
	$(BIN)/python -m pip --python $(PEER_VENV)/bin/python install -c $(LOCK) -c requirements/peer.txt cryodrgn==4.3.1
	touch $@

peer: $(PEER_STAMP)

# Headless Chromium for the results-page tests (tests/test_page_browser.py) and bench: Debian's
# chromium and chromium-driver, driven through selenium (in the lock). Installed with apt-get
# where we are root; elsewhere the browser tests skip and say why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: chromium and chromium-driver are not installed (needs root and apt-get); the browser tests will skip"; fi

# The page's JavaScript (NGL) is committed under deephemnma/report/vendor/ as package data;
# these refetch it from the npm registry (npm pack) and check it against the pinned integrity.
vendor:
	$(BIN)/python scripts/vendor_js.py
vendor-check:
	$(BIN)/python scripts/vendor_js.py --check

test: install
	-$(MAKE) --no-print-directory peer || echo "note: cryoDRGN peer environment not installed; its tests will skip"
	-$(MAKE) --no-print-directory browser || echo "note: headless Chromium not installed; the browser tests will skip"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete

bench: install
	for s in bench/bench_*.py; do $(BIN)/python $$s || exit 1; done

clean:
	rm -rf results .snakemake
