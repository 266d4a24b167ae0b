# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0

.PHONY: install test test-fast demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	# torch first, from the pinned pair that works on CPU here (see README)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import reir, torch, ray, deepspeed, pymilvus, milvus_lite, transformers"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# two xdist workers: the Ray tests on one, the rest beside them (tests/conftest.py)
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 2

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not e2e and not slow"

demo: install
	$(VENV)/bin/reir demo --out demo_out

lint: install
	$(VENV)/bin/ruff check reir tests bench

clean:
	rm -rf demo_out runs .pytest_cache
