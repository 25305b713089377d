# fruits-pipeline: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/fruits-pipeline
DEMO_OUT ?= demo-output
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-explore lint bench clean

# uv (from PyPI, into the venv) installs the same pinned set as pip in under half the time
# (README, "Set-up time"); plain pip if anything in the uv path fails.  uv ignores the upper
# bound of a package's Requires-Python, pip does not: the constraint holds back the one release
# that excludes our Python (backports.strenum 1.3.1 is <3.11; ai-edge-litert needs the
# package), so both install the same versions.
UV_CONSTRAINTS := backports.strenum<1.3; python_version >= "3.11"
# S3A connector jars for s3a:// (hadoop-aws 3.3.1 + its AWS SDK bundle) from PyPI, not Maven;
# --no-deps: the package pins pyspark 3.3.0. stages/s3a.py checks their SHA-256.
S3A_JARS := 'sagemaker_pyspark==1.4.5'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its test tools into $(VENV) (uv; pip if uv fails)"
	@echo '$(UV_CONSTRAINTS)' > $(VENV)/constraints-uv.txt
	@# -q/-qq: errors still show; setuptools' generic note on editable installs of a flat
	@# layout (our fixed top level) does not.
	@# --compile-bytecode: uv writes no .pyc by default (pip does), and a Python started with
	@# PYTHONDONTWRITEBYTECODE=1 never writes one: every process (the driver, each Spark
	@# worker) would compile pyspark, pandas and numpy from source, ~1 CPU-s each
	@# (benchmarks/README.md, section 1).
	@if $(PY) -m pip install -qq uv \
		&& $(PY) -m uv pip install -q --compile-bytecode --python $(PY) -c $(VENV)/constraints-uv.txt -e '.[test]' \
		&& $(PY) -m uv pip install -q --compile-bytecode --python $(PY) --no-deps $(S3A_JARS); then :; else \
		echo "uv failed: installing with pip" >&2; \
		$(PY) -m pip install -qq --upgrade pip \
		&& $(PY) -m pip install -qq -e '.[test]' \
		&& $(PY) -m pip install -qq --no-deps $(S3A_JARS); \
	fi
	@$(PY) -m compileall -q stages linalg cluster > /dev/null
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(CLI) run sample/fruits360 $(DEMO_OUT)/Results --features $(DEMO_OUT)/Features \
		--weights bundled --variance 0.95 --check spark-ml --overwrite
	$(CLI) report $(DEMO_OUT)/Results --out $(DEMO_OUT)/report.html
	@echo "Features: $(DEMO_OUT)/Features  Results: $(DEMO_OUT)/Results  Report: $(DEMO_OUT)/report.html"

test: $(STAMP)
	$(PY) -m pytest -q

# The hypothesis properties with new random draws each run (`make test`
# draws the same ones every time).
test-explore: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q -m "not slow and not cluster and not jvm and not tensorflow"

# While editing: no JVM, no TensorFlow, no extra processes (kernels, parameters, packing,
# EMR spec and guard, report pieces). The whole suite is `make test` (CI).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cluster and not jvm and not tensorflow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check stages linalg cluster tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/featurize_bench.py --quick
	$(PY) benchmarks/decode_bench.py --quick
	$(PY) benchmarks/reduce_bench.py --quick
	$(PY) benchmarks/instance_sizes.py --quick
	$(PY) benchmarks/search_bench.py --quick

clean:
	rm -rf $(DEMO_OUT) spark-warehouse .pytest_cache
