# The two set-up commands:  `make demo`  and  `make test`  (each creates .venv when missing).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.hubmerge-installed

.PHONY: venv demo test test-fast bench bench-accuracy bench-mergekit clean

$(STAMP): pyproject.toml setup.py plugins/_ckernels.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel: the range in pyproject.toml then installs nothing more
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[space,suite,test,ray]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hubmerge demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_merge.py

bench-accuracy: $(STAMP)
	$(PY) benchmarks/bench_accuracy.py

bench-mergekit: $(STAMP)
	$(PY) benchmarks/bench_vs_mergekit.py

clean:
	rm -rf $(VENV) .pytest_cache .hubmerge-demo
