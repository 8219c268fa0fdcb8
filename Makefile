# Two entry points that work on a fresh machine with Python >= 3.10:
#   make demo   set up .venv, install ultraep, run the demo on the bundled real trace
#   make test   set up .venv, install ultraep with test extras, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# Pinned so a fresh machine takes the local CPU build instead of a multi-GB CUDA download;
# override with TORCH_SPEC="torch" to bring your own build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip

.PHONY: demo test setup clean bench bench-gpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,triton]" || $(PIP) install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ultraep demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python benchmarks/planner.py --out docs/benchmarks_planner.md
	$(VENV)/bin/python benchmarks/planner_hard.py --out docs/benchmarks_planner_hard.md
	$(VENV)/bin/python benchmarks/runtime.py
	$(VENV)/bin/python benchmarks/simulate.py --out docs/benchmarks_simulate.md --no-progress

bench-gpu: setup
	$(VENV)/bin/python benchmarks/gpu_bench.py --out docs/benchmarks_gpu.md

clean:
	rm -rf $(VENV) build *.egg-info
