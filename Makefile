# The README's commands. Each target installs what it needs into .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install quickstart lint test test-slow bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel from the
	# machine's find-links instead of pulling a multi-GB CUDA build.
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Train and release 4 versions of the embedded corpus on a local Ray cluster.
quickstart: $(STAMP)
	$(BIN)/raypath run configs/quickstart.yaml

# Lint (ruff, configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .

# What CI runs (.ci/run): lint, then everything but the tests marked slow.
test: lint
	$(BIN)/python -m pytest -m "not slow" -q --durations=25

# Long end-to-end tests, not in CI.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

clean:
	rm -rf runs .pytest_cache
