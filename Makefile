# The two set-up commands (README): `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test crosscheck notebooks bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

## demo: a completion on the bundled model, streamed to the terminal
demo: $(STAMP)
	$(BIN)/refcomplete complete "ROMEO:" --max-tokens 60 --temperature 0.8 --top-p 0.95 --seed 1
	$(BIN)/refcomplete complete "JULIET:" --max-tokens 12 --temperature 0 --logprobs 3

## test: the whole test suite (cross-checks against torch run where torch is installed)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## crosscheck: live checks against HF transformers (installs torch==2.13.0, a CPU build)
crosscheck: $(STAMP)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,crosscheck]'
	$(BIN)/python -m pytest -q -m crosscheck -rs

## notebooks: execute every notebook top to bottom (nbmake)
notebooks: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,notebooks]'
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=300 notebooks/

## bench: throughput against HF transformers in the same run (needs `make crosscheck` first)
bench: $(STAMP)
	$(BIN)/python bench/bench_runtime.py

clean:
	rm -rf $(VENV) build dist *.egg-info
