#!/usr/bin/env bash
# EMR bootstrap action of fruits-pipeline.  Runs on every node (primary, core, task; also
# the nodes managed scaling adds later) as the hadoop user, before YARN and Spark start,
# so a failure here fails the cluster at once instead of the first Spark task an hour later.
#
#   usage: bootstrap-emr.sh s3://BUCKET/code/VERSION/fruits_pipeline-VERSION-py3-none-any.whl
#
# EMR 7.6.0 runs PySpark on Python 3.9 by default; our libraries and the project itself go
# to Python 3.11, which the spark-env and livy-env classifications make Spark and Livy use.
# Steps, Livy sessions and notebook kernels then all import this one installed copy.
# pyspark itself is EMR's Spark 3.5.3 (spark-submit and Livy put it on PYTHONPATH): never
# pip-install it here.
set -euo pipefail

WHEEL_URI="${1:?usage: bootstrap-emr.sh s3://BUCKET/code/VERSION/fruits_pipeline-...-py3-none-any.whl}"
# Overridable only so that tests/cluster/test_package.py can run this script in a sandbox.
PYTHON="${FRUITS_BOOTSTRAP_PYTHON:-/usr/bin/python3.11}"
WEIGHTS_DIR="${FRUITS_BOOTSTRAP_WEIGHTS_DIR:-/opt/fruits-pipeline/weights}"

# Exact versions inside pyproject.toml's ranges (tests/cluster/test_package.py checks that
# they agree).  numpy stays < 2: pyspark 3.5's Arrow and ML paths are not numpy-2 clean.
# matplotlib: the notebook's figures and the report, drawn on the driver.
PINS=(
  "tensorflow-cpu==2.21.0"
  "ai-edge-litert==2.3.0"
  "numpy==1.26.4"
  "scipy==1.17.1"
  "pandas==2.2.3"
  "pyarrow==17.0.0"
  "pillow==13.0.0"
  "boto3==1.44.8"
  "matplotlib==3.11.2"
  "faiss-cpu==1.15.1"
)
# Graviton (aarch64) nodes: the same versions, as aarch64 wheels.  tensorflow-cpu has no
# aarch64 wheel; there `tensorflow` is the CPU build (no CUDA on aarch64).  Every other pin
# has one (`fruits-pipeline emr plan --instance-type m7g.xlarge` asks PyPI before a start).
# cluster/package.py's AARCH64_NAMES is this table (tests/cluster/test_bootstrap.py).
if [ "$(uname -m)" = "aarch64" ]; then
  PINS=("${PINS[@]/#tensorflow-cpu==/tensorflow==}")
fi

log() { echo "fruits-pipeline bootstrap: $*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "installing python3.11"
  sudo dnf install -y -q python3.11
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  log "installing pip for python3.11"
  sudo dnf install -y -q python3.11-pip
fi

# Fetched first: a wrong code URI fails the node in seconds, not after installing TensorFlow.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
wheel="$tmp/${WHEEL_URI##*/}"
aws s3 cp --only-show-errors "$WHEEL_URI" "$wheel"

log "pip install ${PINS[*]}"
sudo "$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check "${PINS[@]}"
# Fail here, with the reason in the bootstrap log, rather than in a Spark task.
"$PYTHON" -c "import numpy, scipy, pandas, pyarrow, PIL, matplotlib, tensorflow; print('tensorflow', tensorflow.__version__)"
# The default featurize engine (LiteRT): x86_64 and aarch64 (manylinux_2_27) wheels.
"$PYTHON" -c "from ai_edge_litert.interpreter import Interpreter; print('ai-edge-litert ok')"

# The project: the wheel `emr up` built from the same files as s3://B/code/VERSION/.
# --no-deps: the pins above are its dependencies, and pyspark comes from EMR.
log "pip install ${wheel##*/}"
sudo "$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
  --no-deps --no-index "$wheel"
# Import what a step imports before Spark is there (pyspark is imported lazily), and find
# the bundled weights inside the installed package.
bundled="$(cd / && "$PYTHON" -c '
import cluster.spec, linalg.distributed, stages.cli, stages.featurize.frame, stages.notebook
import stages.reduce.full, stages.report
from stages.featurize.model import BUNDLED_WEIGHTS
assert BUNDLED_WEIGHTS.is_file(), BUNDLED_WEIGHTS
print(BUNDLED_WEIGHTS.parent)
')"

# --weights bundled in a step: the copy on each node's local disk (the step passes its path).
sudo mkdir -p "$WEIGHTS_DIR"
# With the pre-converted TFLite model beside it, the LiteRT engine needs no conversion.
sudo cp "$bundled"/*.h5 "$bundled"/*.tflite "$bundled"/NOTICE.md "$bundled"/SHA256SUMS "$WEIGHTS_DIR"/
sudo chmod -R a+rX "$WEIGHTS_DIR"
log "done: $("$PYTHON" -m pip show fruits-pipeline 2>/dev/null | grep -m1 '^Version:'), weights in $WEIGHTS_DIR: $(ls "$WEIGHTS_DIR" | tr '\n' ' ')"
