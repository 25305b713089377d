#!/usr/bin/env bash
# EMR bootstrap action of fruits-pipeline.  Runs on every node (primary, core, task) as the
# hadoop user, before YARN and Spark start, so a failure here fails the cluster at once
# instead of the first Spark task an hour later.
#
#   usage: bootstrap-emr.sh s3://BUCKET/code/VERSION/
#
# EMR 7.6.0 runs PySpark on Python 3.9 by default; our libraries go to Python 3.11, which
# the spark-env classification of the cluster makes Spark use.  pyspark itself is EMR's
# Spark 3.5.3 (spark-submit puts it on PYTHONPATH): never pip-install it here.
set -euo pipefail

CODE_URI="${1:?usage: bootstrap-emr.sh s3://BUCKET/code/VERSION/}"
PYTHON=/usr/bin/python3.11
WEIGHTS_DIR=/opt/fruits-pipeline/weights

# Exact versions inside pyproject.toml's ranges (tests/test_cluster_package.py checks that
# they agree).  numpy stays < 2: pyspark 3.5's Arrow and ML paths are not numpy-2 clean.
PINS=(
  "tensorflow-cpu==2.21.0"
  "numpy==1.26.4"
  "scipy==1.17.1"
  "pandas==2.2.3"
  "pyarrow==17.0.0"
  "pillow==13.0.0"
  "boto3==1.44.8"
  "faiss-cpu==1.15.1"
)

log() { echo "fruits-pipeline bootstrap: $*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "installing python3.11"
  sudo dnf install -y -q python3.11
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  log "installing pip for python3.11"
  sudo dnf install -y -q python3.11-pip
fi

log "pip install ${PINS[*]}"
sudo "$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check "${PINS[@]}"
# Fail here, with the reason in the bootstrap log, rather than in a Spark task.
"$PYTHON" -c "import numpy, scipy, pandas, pyarrow, PIL, tensorflow; print('tensorflow', tensorflow.__version__)"

# --weights bundled: h5py cannot open an .h5 inside the --py-files zip, so each node gets
# the bundled weights on local disk (the step passes their path).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
aws s3 cp --only-show-errors "${CODE_URI%/}/fruits_pipeline.zip" "$tmp/fruits_pipeline.zip"
sudo mkdir -p "$WEIGHTS_DIR"
sudo "$PYTHON" - "$tmp/fruits_pipeline.zip" "$WEIGHTS_DIR" <<'PY'
import os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as zf:
    for name in zf.namelist():
        if name.startswith("stages/weights/") and not name.endswith("/"):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                out.write(zf.read(name))
PY
sudo chmod -R a+rX "$WEIGHTS_DIR"
log "done: $(ls "$WEIGHTS_DIR" | tr '\n' ' ')"
