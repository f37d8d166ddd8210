# The two commands of the README: `make demo` runs the main job on the built-in default,
# `make test` runs the test suite. Each sets up everything it needs first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(VENV)/bin/shoal run

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache
