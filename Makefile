# fruits-pipeline: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/fruits-pipeline
DEMO_OUT ?= demo-output
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# Test-only S3A jars for Spark (hadoop-aws 3.3.1 + aws-java-sdk-bundle): no Maven here.
	$(PY) -m pip install --quiet --no-deps 'sagemaker_pyspark==1.4.5'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(CLI) run sample/fruits360 $(DEMO_OUT)/Results --features $(DEMO_OUT)/Features \
		--weights bundled --variance 0.95 --check spark-ml --overwrite
	$(CLI) report $(DEMO_OUT)/Results --out $(DEMO_OUT)/report.html
	@echo "Features: $(DEMO_OUT)/Features  Results: $(DEMO_OUT)/Results  Report: $(DEMO_OUT)/report.html"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check stages linalg cluster tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/featurize_bench.py --quick
	$(PY) benchmarks/decode_bench.py --quick
	$(PY) benchmarks/reduce_bench.py --quick
	$(PY) benchmarks/instance_sizes.py --quick

clean:
	rm -rf $(DEMO_OUT) spark-warehouse .pytest_cache
