# paramtool developer tasks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime

.PHONY: demo test bench fuzz samples clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned for dev/CI: a local CPU build; the package itself accepts torch>=2.4.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	# torch pinned in the same command, or transformers/lightning pull a newer (CUDA) torch
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev,test]"
	$(PY) -m compileall -q src  # bytecode for the editable install (PYTHONDONTWRITEBYTECODE may be set)
	touch $(STAMP)

# demo: only what running paramtool needs (torch, safetensors, numpy, typer, rich); no test or integration extras
$(RUNTIME): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0" -e .
	$(PY) -m compileall -q src
	touch $(RUNTIME)

samples: $(STAMP)
	$(PY) sample_models/generate.py

demo: $(RUNTIME)
	$(VENV)/bin/paramtool inspect sample_models/rgnet.pt
	$(VENV)/bin/paramtool ties sample_models/tied.pt

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_merge.py

fuzz: $(STAMP)
	PARAMTOOL_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests -k fuzz

clean:
	rm -rf $(VENV) build src/*.egg-info
