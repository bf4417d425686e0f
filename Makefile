# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test info venv

venv:
	bash scripts/setup_venv.sh

demo: venv
	$(PY) -m ghostfast demo

info: venv
	$(PY) -m ghostfast info

# Triton runs under its CPU interpreter when no GPU is present (tests/conftest.py sets TRITON_INTERPRET).
test: venv
	$(PY) -m pytest -q -ra tests
